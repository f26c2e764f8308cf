"""Upstream CombLlama checkpoints: a tiny synthetic checkpoint in the reference HF layout (shijuzhao/Comb
CombLlamaForConditionalGeneration) loads onto its backbone, computes what the reference layers compute,
and serves a memory end to end; a checkpoint for another backbone is refused."""
from __future__ import annotations

import json

import pytest
import torch

from combllama.core.encode import EncodeConfig, ingest
from combllama.core.engine import Engine, GenerateOptions
from combllama.core.errors import BadInputError, IncompatibleMemoryError
from combllama.core.methods import from_manifest, get_method
from combllama.core.methods.combllama.upstream import load_upstream
from combllama.core.prompt import turn_ids


def write_checkpoint(root, model, seed=0, cross=(1,)):
    """A CombLlama directory for `model`'s backbone with random encoder and cross weights, nonzero gates."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    c = model.config
    d, f, D = c.hidden_size, c.intermediate_size, c.head_dim
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.1).contiguous()  # noqa: E731
    t = {"chunk_model.embed_tokens.weight": model.get_input_embeddings().weight.detach().clone(),
         "language_model.model.embed_tokens.weight": model.get_input_embeddings().weight.detach().clone()}
    for i in range(len(cross)):
        e = f"chunk_model.layers.{i}"
        t.update({f"{e}.self_attn.q_proj.weight": rnd(H * D, d), f"{e}.self_attn.k_proj.weight": rnd(Hkv * D, d),
                  f"{e}.self_attn.v_proj.weight": rnd(Hkv * D, d), f"{e}.self_attn.o_proj.weight": rnd(d, H * D),
                  f"{e}.mlp.gate_proj.weight": rnd(f, d), f"{e}.mlp.up_proj.weight": rnd(f, d),
                  f"{e}.mlp.down_proj.weight": rnd(d, f), f"{e}.input_layernorm.weight": 1 + rnd(d),
                  f"{e}.post_attention_layernorm.weight": 1 + rnd(d),
                  f"chunk_model.k_proj.{i}.weight": rnd(Hkv * D, d), f"chunk_model.v_proj.{i}.weight": rnd(Hkv * D, d)})
        x = f"language_model.model.cross_layers.{i}"
        t.update({f"{x}.cross_attn.q_proj.weight": rnd(H * D, d), f"{x}.cross_attn.o_proj.weight": rnd(d, H * D),
                  f"{x}.cross_attn.q_norm.weight": 1 + rnd(D), f"{x}.cross_attn.k_norm.weight": 1 + rnd(D),
                  f"{x}.input_layernorm.weight": 1 + rnd(d), f"{x}.post_attention_layernorm.weight": 1 + rnd(d),
                  f"{x}.mlp.gate_proj.weight": rnd(f, d), f"{x}.mlp.up_proj.weight": rnd(f, d),
                  f"{x}.mlp.down_proj.weight": rnd(d, f), f"{x}.cross_attn_attn_gate": torch.tensor([0.7]),
                  f"{x}.cross_attn_mlp_gate": torch.tensor([-0.4])})
    root.mkdir(parents=True, exist_ok=True)
    save_file(t, str(root / "model.safetensors"))
    text = c.to_dict()
    text["num_hidden_layers"] = c.num_hidden_layers + len(cross)
    (root / "config.json").write_text(json.dumps({"model_type": "combllama", "text_config": text,
                                                  "cross_attention_layers": list(cross),
                                                  "num_hidden_layers": c.num_hidden_layers + len(cross),
                                                  "chunk_token_index": 0, "pad_token_id": 0}))
    return t


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_layers_compute_what_the_reference_computes(tiny, tmp_path):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = tiny.model
    t = write_checkpoint(tmp_path / "ckpt", model)
    adapter = load_upstream(tmp_path / "ckpt", model)
    c = model.config
    eps, Hkv, D = c.rms_norm_eps, c.num_key_value_heads, c.head_dim
    assert adapter.config.cross_layers == (1,) and adapter.config.rank == 0 and adapter.config.qk_norm

    # Chunk model: a bidirectional Llama decoder layer with chunk-local RoPE, then k_proj/v_proj, k_norm.
    ids = torch.randint(0, 1000, (11,))
    ref_layer = LlamaDecoderLayer(c, 0).eval()
    ref_layer.load_state_dict({k.removeprefix("chunk_model.layers.0."): v for k, v in t.items()
                               if k.startswith("chunk_model.layers.0.")})
    ref_layer.self_attn.is_causal = False
    emb = model.get_input_embeddings()(ids)[None]
    pos = torch.arange(11)[None]
    with torch.no_grad():
        h = ref_layer(emb, position_embeddings=model.model.rotary_emb(emb, pos), attention_mask=None)
        h = h[0] if isinstance(h, tuple) else h
        k_ref = _rms((h @ t["chunk_model.k_proj.0.weight"].T).view(1, 11, Hkv, D),
                     t["language_model.model.cross_layers.0.cross_attn.k_norm.weight"], eps)[0]
        v_ref = (h @ t["chunk_model.v_proj.0.weight"].T).view(1, 11, Hkv, D)[0]
        (k, v), = adapter.encode(model, ids, torch.tensor([0, 11], dtype=torch.int32))
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-4)

    # Cross layer: q_norm'd queries over the memory, tanh gates on attention and MLP.
    x = "language_model.model.cross_layers.0"
    hs = torch.randn(1, 5, c.hidden_size)
    with torch.no_grad():
        u = _rms(hs, t[f"{x}.input_layernorm.weight"], eps)
        q = _rms((u @ t[f"{x}.cross_attn.q_proj.weight"].T).view(1, 5, -1, D), t[f"{x}.cross_attn.q_norm.weight"], eps)
        G = q.shape[2] // Hkv
        kk, vv = k.repeat_interleave(G, 1).transpose(0, 1), v.repeat_interleave(G, 1).transpose(0, 1)  # [H, M, D]
        a = ((q[0].transpose(0, 1) @ kk.transpose(1, 2)) / D ** 0.5).softmax(-1) @ vv  # [H, 5, D]
        out = hs + torch.tanh(torch.tensor(0.7)) * (a.transpose(0, 1).reshape(1, 5, -1) @ t[f"{x}.cross_attn.o_proj.weight"].T)
        m = _rms(out, t[f"{x}.post_attention_layernorm.weight"], eps)
        mlp = (torch.nn.functional.silu(m @ t[f"{x}.mlp.gate_proj.weight"].T) * (m @ t[f"{x}.mlp.up_proj.weight"].T)) \
            @ t[f"{x}.mlp.down_proj.weight"].T
        ref = out + torch.tanh(torch.tensor(-0.4)) * mlp
        got = adapter.cross[0](hs, k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_upstream_checkpoint_serves_a_memory(tiny, long_doc, store, tmp_path):
    write_checkpoint(tmp_path / "ckpt", tiny.model)
    method = get_method("combllama", {"adapter": str(tmp_path / "ckpt")})
    result = ingest(tiny, long_doc, method, store, name="up", config=EncodeConfig(chunk_tokens=256))
    reader = store.open(result.name)
    memory = from_manifest(reader.manifest).attach(tiny.model, reader.manifest, reader.chunks())
    assert memory.cross.adapter.config.qk_norm and not memory.cross.adapter.config.chunk_order
    out = list(Engine(tiny.model, memory, tiny.eos_ids).generate(turn_ids(tiny.tokenizer, "Which lantern?"),
                                                                  GenerateOptions(max_new_tokens=4)))
    assert 1 <= len(out) <= 4


def test_checkpoint_for_another_backbone_is_refused(tiny, tiny_dir_other, tmp_path):
    from combllama.core.model import ModelSpec, load_model

    other = load_model(ModelSpec(str(tiny_dir_other), device="cpu"))
    write_checkpoint(tmp_path / "ckpt", other.model)
    with pytest.raises(IncompatibleMemoryError):
        load_upstream(tmp_path / "ckpt", tiny.model)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BadInputError):
        load_upstream(tmp_path / "plain", tiny.model)
