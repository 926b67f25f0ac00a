"""The language model side: loading a model offline (loader), reading and editing its
residual stream, MLP and attention outputs (hooks), and sampling text (texts)."""
