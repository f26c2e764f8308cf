"""Training CombLlama adapters (the encoder and cross blocks of core/methods/combllama) on a frozen base model.

prepare.py builds token shards on a CPU machine; train.py trains under torchrun on 1 or N GPUs (or CPU in
--smoke mode). Imports core; nothing imports this package.
"""
