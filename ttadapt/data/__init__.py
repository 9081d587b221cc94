"""Package data: the embedded tiny OLMoE and held-out snippets for the demo."""
