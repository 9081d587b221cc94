"""Speed and memory benchmarks: plain ``generate`` vs ``ttadapt.generate`` presets, side by side."""
