"""arq glue: the worker process that hosts capi's stream consumers. Thin by design."""
