"""combllama's engine room: models, tokenization, the memory format, the methods and the engine.

Nothing in here prints or imports click/rich; progress leaves through callbacks and failures through
the typed errors of `core.errors`.
"""
