"""The quality harness: methods × memory budgets × tasks on one model, peers (kvpress) in the same table.

It imports core and uses only its public functions (plan_memory, ingest, from_manifest().attach,
Engine, prefill); nothing imports evals. Entry point: `python -m combllama.evals run ...`.
"""
