"""The config class of a `domainprune export --to vllm` checkpoint, copied into it as `configuration_decilm.py`.

vLLM runs per-layer widths through its DeciLM model (vllm/model_executor/models/nemotron_nas.py), which reads
`config.block_configs[i].attention.no_op / .n_heads_in_group` and `.ffn.no_op / .intermediate_size` as attributes.
Neither transformers nor vLLM defines the `nemotron-nas` config, so the checkpoint carries this file and vLLM loads it
with `--trust-remote-code`. It is a LlamaConfig plus the block list; nothing else runs from it.
"""

from transformers import LlamaConfig


class BlockSection(dict):
    """One block's `attention` or `ffn` settings: a dict (so the config stays plain JSON) read as attributes, as vLLM
    does; a missing key raises AttributeError, so vLLM's `hasattr(ffn, "ffn_mult")` is False and the explicit
    `intermediate_size` is used."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __post_init__(self, **kwargs):
        blocks = kwargs.pop("block_configs", None) or getattr(self, "block_configs", None) or []
        super().__post_init__(**kwargs)
        self.block_configs = [
            BlockSection({part: BlockSection(block[part]) for part in ("attention", "ffn")}) for block in blocks
        ]

    def validate_architecture(self):
        """head_dim is explicit: a pruned hidden size need not be a multiple of the head count."""
