"""Public ops: one module per op (validation, registration, dispatch, autograd)."""
