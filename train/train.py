"""Train a CombLlama adapter on a frozen base model: distillation to the full-context base model plus
next-token loss, bf16 on CUDA, DDP under torchrun (1 or N GPUs, the same script), CPU in --smoke mode.

One sample: a window of prepare.py's tokens split into a context of C tokens and a continuation y of T.
  teacher (frozen base, no grad): [prompt prefix][context][y]                      → logits over y[1:]
  student (base + adapter):       [prompt prefix][last W of context] as a plain KV cache, then [y] reading
                                  cross memory = encoder(the context's other chunks)     → logits over y[1:]
The prompt prefix is core.prompt's memory prefix (chat template + system text), so the student sees
exactly what `combllama.core.methods.combllama` attaches: the prefix and the document's recent tail (the
`recent` option) as a KV cache the base model wrote alone, the rest of the document as cross memory, the text
after it at positions following the cache. W is 0 for a batch with probability --recent-zero, else uniform
in [16, --recent-max] (0 when --recent-max is 0). y[0] is input only, as the first token after an attached
memory is. Context chunks have random lengths
(packed, variable-length encoder batches); with probability --copy-frac y repeats a span of the context
(exact retrieval through the memory is what the reference model lacked).

Writes under --out (default $OUT): the adapter as ONE safetensors file (core/methods/combllama/weights.py;
low-rank deltas, gates, norms, chunk embeddings; ≤ 16 MiB) named after the model, checkpoint.safetensors
every --ckpt-every steps, train_log.csv (one row per logged step) and train_summary.json. Each logged row also
has kl_other: the same batch scored with every sample reading another sample's memory. A run whose kl stays
at kl_other has learned a bias of the gates, not to read its memory.

    torchrun --nproc_per_node=1 -m combllama.train.train --model DIR --data .carry/train --out $OUT
    python -m combllama.train.train --smoke                      # CPU, tiny random model, seconds

--init PATH continues from an adapter file (this script's output or the shipped adapter): its config must
equal the one the arguments build (rank, cross layers, switches) and its base weights the model's; its
tensors (bf16 on disk, gates fp32) become the fp32 master weights; the optimizer starts fresh (warmup again).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="torchrun -m combllama.train.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2)")
    ap.add_argument("--data", default=".carry/train", help="prepare.py output folder")
    ap.add_argument("--out", default=os.environ.get("OUT", "train-out"))
    ap.add_argument("--name", default=None, help="adapter file name (default: from the model)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--time-limit", type=float, default=450.0, help="seconds of training before stopping early")
    ap.add_argument("--batch", type=int, default=8, help="samples per GPU per step")
    ap.add_argument("--context", type=int, default=2048, help="context tokens (encoded into the memory)")
    ap.add_argument("--cont", type=int, default=256, help="continuation tokens (scored)")
    ap.add_argument("--chunk-min", type=int, default=128)
    ap.add_argument("--chunk-max", type=int, default=512)
    ap.add_argument("--copy-frac", type=float, default=0.2)
    ap.add_argument("--recent-max", type=int, default=0, metavar="W",
                    help="largest recent tail (context tokens kept as a plain KV cache, not cross memory)")
    ap.add_argument("--recent-zero", type=float, default=0.25, help="share of batches without a recent tail")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--init", default=None, metavar="PATH",
                    help="start from this adapter file (weights.py save_adapter; same config and base model)")
    ap.add_argument("--encoder", choices=("stack", "base"), default="base",
                    help="stack: X copied layers on the embeddings; base: the frozen model's own states (modules.py)")
    ap.add_argument("--no-chunk-order", action="store_true", help="no chunk-index embedding (ablation)")
    ap.add_argument("--qk-norm", action="store_true")
    ap.add_argument("--null-slot", action="store_true", help="a learned null key (zero value) in every cross block")
    ap.add_argument("--cross-every", type=int, default=4, metavar="N",
                    help="a cross block before every Nth decoder layer (4: the design; other values are ablations)")
    ap.add_argument("--positions", choices=("chunk", "document"), default="chunk",
                    help="base encoder key positions: each chunk just before the query, or at its distance in the text")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--gate-lr", type=float, default=5e-3, help="learning rate of the tanh gates")
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=0.2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="CPU-sized run: tiny shapes, few steps")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps = min(args.steps, 4) if args.steps == 2400 else args.steps
        args.batch, args.context, args.cont = 2, 96, 24
        args.chunk_min, args.chunk_max, args.warmup, args.log_every, args.ckpt_every = 16, 48, 1, 1, 2
        args.rank = min(args.rank, 4)
        args.recent_max = min(args.recent_max, 32)
    if not 16 <= args.chunk_min <= args.chunk_max or args.context < args.chunk_min or args.cont < 2:
        ap.error("need 16 <= chunk-min <= chunk-max, context >= chunk-min, cont >= 2")
    if args.cross_every < 1:
        ap.error("--cross-every must be at least 1")
    if args.recent_max and not 16 <= args.recent_max <= args.context - args.chunk_min:
        ap.error("--recent-max must be 0 or in [16, context - chunk-min]")
    if not 0 <= args.recent_zero <= 1:
        ap.error("--recent-zero must be in [0, 1]")
    return args


# --- distributed ---------------------------------------------------------------------------------------------

def setup_distributed(smoke: bool):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not smoke
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


# --- model ---------------------------------------------------------------------------------------------------

def load_base(args, device):
    """LoadedModel-like (model, tokenizer, fingerprint, name) with the base frozen."""
    from ..core.model import ModelSpec, load_model

    if args.model is None and args.smoke:
        return tiny_random_model(device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    loaded = load_model(ModelSpec(args.model, device=str(device), dtype=dtype))
    loaded.model.requires_grad_(False).eval()
    return loaded


def tiny_random_model(device):
    """A seeded 4-layer random Llama with SmolLM2's tokenizer (smoke runs without a model directory)."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from ..core.model import ModelSpec, fingerprint, load_tokenizer

    tok = load_tokenizer(ModelSpec()).tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(device).eval().requires_grad_(False)
    return SimpleNamespace(model=model, tokenizer=tok, fingerprint=fingerprint(model, tok), name="tiny-random")


class Student(nn.Module):
    """The trainable adapter (registered) around the frozen base model (not registered: DDP never
    broadcasts or reduces it). forward(ids, cu_seqlens, chunk_index, head, dec_ids) → logits [B, T-1, V], one
    after each decoder id."""

    def __init__(self, adapter, base):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "base", base)

    def forward(self, ids, cu_seqlens, chunk_index, head, dec_ids, shift: int = 0, after=None):
        """`head` [B, P+W]: the prompt prefix and recent tail, read by the base model alone into a KV cache (as
        attach gets it); `dec_ids` [B, T-1] read it and the cross memory of the packed chunks `ids`. `shift` k
        gives sample b the memory of sample b+k (the memory-use check: another text's memory); `after` [chunks]
        long: the context tokens after each chunk (read by positions="document")."""
        from transformers import DynamicCache

        from ..core.methods.combllama.modules import KWARG, CrossInput

        B, H = head.shape
        with torch.no_grad():
            cache = DynamicCache()
            self.base.model(input_ids=head, past_key_values=cache, use_cache=True)
        kv = self.adapter.encode(self.base, ids, cu_seqlens, chunk_index, after)  # X × (K, V) [B*C, Hkv, D]
        keys = [k.view(B, -1, *k.shape[1:]).transpose(1, 2).roll(-shift, 0) for k, _ in kv]  # [B, Hkv, C, D]
        values = [v.view(B, -1, *v.shape[1:]).transpose(1, 2).roll(-shift, 0) for _, v in kv]
        pos = torch.arange(H, H + dec_ids.shape[1], device=dec_ids.device)[None].expand(B, -1)
        out = self.base(input_ids=dec_ids, position_ids=pos, past_key_values=cache, use_cache=True,
                        logits_to_keep=dec_ids.shape[1], **{KWARG: CrossInput(self.adapter, keys, values)})
        return out.logits


# --- data ----------------------------------------------------------------------------------------------------

class Shards:
    """The token streams of prepare.py's shards; windows are drawn across document boundaries (a memory
    of several files is what the tool sees too)."""

    def __init__(self, folder: Path, vocab: int):
        from safetensors.numpy import load_file

        manifest = json.loads((folder / "manifest.json").read_text())
        if manifest.get("format") != "combllama-train-shards":
            raise SystemExit(f"{folder}: not a prepare.py output")
        if manifest["vocab"] > vocab:
            raise SystemExit(f"{folder}: shards use a {manifest['vocab']}-token vocabulary, the model has {vocab}")
        self.manifest = manifest
        self.streams = [load_file(str(folder / s["file"]))["tokens"] for s in manifest["shards"]]
        self.sizes = [len(s) for s in self.streams]

    def window(self, rng: random.Random, n: int) -> list[int]:
        s = rng.choices(range(len(self.streams)), weights=self.sizes)[0]
        stream = self.streams[s]
        if len(stream) <= n:
            raise SystemExit(f"shard {s} holds {len(stream)} tokens, fewer than a {n}-token sample")
        a = rng.randrange(0, len(stream) - n)
        return stream[a:a + n].astype("int64").tolist()


def chunk_lengths(rng: random.Random, total: int, lo: int, hi: int) -> list[int]:
    """Random chunk lengths in [lo, hi] summing to `total` (the last may be shorter than lo but >= 1)."""
    out = []
    while total > 0:
        n = min(total, rng.randint(lo, hi))
        out.append(n)
        total -= n
    return out


def make_batch(shards: Shards, rng: random.Random, args, prefix: list[int], device):
    """Teacher ids [B, P+C+T-1], the student's head [B, P+W] (prefix + the context's last W tokens) and
    decoder ids [B, T-1], packed encoder ids [B*(C-W)] (the rest of the context) with cu_seqlens int32
    [chunks+1], chunk_index [B*(C-W)] and after [chunks] (the memory tokens after each chunk), targets [B, T-1]."""
    C, T = args.context, args.cont
    W = 0 if not args.recent_max or rng.random() < args.recent_zero else rng.randint(16, args.recent_max)
    teach, head, dec, enc, cu, index, after, targets = [], [], [], [], [0], [], [], []
    for _ in range(args.batch):
        if rng.random() < args.copy_frac:
            ctx = shards.window(rng, C)
            a = rng.randrange(0, C - T + 1) if C >= T else 0
            y = (ctx[a:a + T] + shards.window(rng, T))[:T]
        else:
            w = shards.window(rng, C + T)
            ctx, y = w[:C], w[C:]
        teach.append(prefix + ctx + y[:-1])
        head.append(prefix + ctx[C - W:])
        dec.append(y[:-1])
        targets.append(y[1:])
        enc += ctx[:C - W]
        end = 0
        for i, n in enumerate(chunk_lengths(rng, C - W, args.chunk_min, args.chunk_max)):
            cu.append(cu[-1] + n)
            index += [i] * n
            end += n
            after.append(C - W - end)
    t = lambda x, dt=torch.long: torch.tensor(x, dtype=dt, device=device)  # noqa: E731
    return t(teach), t(head), t(dec), t(enc), t(cu, torch.int32), t(index), t(after), t(targets)


# --- loss ----------------------------------------------------------------------------------------------------

def losses(student_logits, teacher_logits, targets, temperature: float):
    """(KL(teacher ‖ student) per token at `temperature`, student CE, teacher CE), logits [B, T, V]."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1), log_target=True,
                  reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), targets.flatten())
    tce = F.cross_entropy(teacher_logits.float().flatten(0, 1), targets.flatten())
    return kl, ce, tce


def lr_at(step: int, args, elapsed: float = 0.0) -> float:
    """Linear warmup, then cosine decay to 10% over the steps or the time limit, whichever ends first."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    p = max((step - args.warmup) / max(1, args.steps - args.warmup), elapsed / args.time_limit)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def check_varlen(device) -> str:
    """Which packed-attention kernel this machine runs (forward and backward tried once)."""
    from ..core.methods.combllama import modules

    if device.type != "cuda":
        return "sdpa-block-diagonal"
    q = torch.randn(40, 4, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(40, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32, device=device)
    try:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k.repeat_interleave(2, 1), k.repeat_interleave(2, 1), cu, cu, 25, 25)
        out.sum().backward()
        return "torch varlen_attn"
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        modules.USE_VARLEN = False
        try:
            import flash_attn  # noqa: F401

            return f"flash-attn (varlen_attn failed: {type(e).__name__})"
        except ImportError:
            return f"sdpa-block-diagonal (varlen_attn failed: {type(e).__name__})"


def load_init(path: str, adapter, config, base_weights: str) -> dict:
    """Copy an adapter file's tensors into `adapter` (fp32 parameters already); returns what the run records:
    path, sha256 and the file's own training info (its steps, its command, and its own init if any)."""
    from safetensors.torch import load_file

    from ..core.methods.combllama.weights import file_digest, read_header

    meta = read_header(Path(path))
    if meta["config"] != config:
        have, want = json.loads(meta["config"].to_json()), json.loads(config.to_json())
        diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)}
        raise SystemExit(f"--init {path}: its config differs from this run's (file, run): {diff}")
    if meta["base_weights"] != base_weights:
        raise SystemExit(f"--init {path}: trained for {meta.get('base_name')!r} ({meta['base_weights'][:18]}…), "
                         f"not this model ({base_weights[:18]}…)")
    state = load_file(str(path), device="cpu")
    missing, unexpected = adapter.load_state_dict(state, strict=False)  # copy_ into the fp32 parameters
    if missing or unexpected:
        raise SystemExit(f"--init {path}: tensors do not match (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    prior = meta["info"]
    return {"path": str(path), "sha256": file_digest(Path(path)).hex(), "steps": prior.get("step"),
            "command": prior.get("command"), "init": prior.get("init")}


# --- main ----------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse(argv)
    rank, world, device = setup_distributed(args.smoke)
    torch.manual_seed(args.seed + rank)
    rng = random.Random(args.seed * 1000 + rank)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    from ..core.methods.combllama.modules import CombAdapter, CombConfig, default_cross_layers, install_hooks
    from ..core.methods.combllama.weights import save_adapter, weights_fingerprint
    from ..core.prompt import DEFAULT_SYSTEM, memory_prefix_ids

    t_start = time.perf_counter()
    base = load_base(args, device)
    model, tok = base.model, base.tokenizer
    kernel = check_varlen(device)
    shards = Shards(Path(args.data), model.config.vocab_size)
    prefix = memory_prefix_ids(tok, DEFAULT_SYSTEM)
    config = CombConfig.for_model(model.config, rank=args.rank, chunk_order=not args.no_chunk_order,
                                  qk_norm=args.qk_norm, encoder=args.encoder, null_slot=args.null_slot,
                                  positions=args.positions,
                                  cross_layers=default_cross_layers(model.config.num_hidden_layers, args.cross_every))
    adapter = CombAdapter.from_base(model, config)
    for p in adapter.parameters():  # fp32 master weights; the frozen copies stay in the base dtype
        p.data = p.data.float()
    base_weights = weights_fingerprint(model)
    init = load_init(args.init, adapter, config, base_weights) if args.init else None
    install_hooks(model)
    student = Student(adapter, model).train()
    net = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    gates = [p for n, p in adapter.named_parameters() if n.endswith("_gate")]
    rest = [p for n, p in adapter.named_parameters() if not n.endswith("_gate")]
    opt = torch.optim.AdamW([{"params": rest, "lr": args.lr, "weight_decay": args.weight_decay},
                             {"params": gates, "lr": args.gate_lr, "weight_decay": 0.0}], betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in opt.param_groups]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    meta = dict(base_fingerprint=base.fingerprint, base_weights=base_weights, base_name=base.name)
    name = args.name or ("smollm2-135m-instruct" if base.name.startswith("smollm2-135m-instruct") else base.name)
    n_train = sum(p.numel() for p in adapter.parameters())
    if rank == 0:
        print(f"combllama train: {base.name} on {device} × {world}, kernel {kernel}, cross layers "
              f"{list(config.cross_layers)}, rank {args.rank}, {n_train:,} trained parameters, prefix {len(prefix)} "
              f"tokens, data {sum(shards.sizes):,} tokens; setup {time.perf_counter() - t_start:.1f} s", flush=True)
        if init:
            print(f"init from {init['path']} (sha256 {init['sha256'][:16]}…, {init['steps']} steps)", flush=True)
    log = open(out / "train_log.csv", "w", newline="") if rank == 0 else None
    writer = csv.writer(log) if log else None
    if writer:
        writer.writerow(["step", "seconds", "lr", "loss", "kl", "ce", "teacher_ce", "gate_attn_mean",
                         "gate_mlp_mean", "tokens_per_s", "kl_other"])
    info = {"args": vars(args), "world": world, "kernel": kernel, "command": " ".join(sys.argv), "init": init}

    def save(path: Path, step: int):
        if rank == 0:
            info.update(step=step)
            save_adapter(path, adapter, **meta, info=info)

    t0 = time.perf_counter()
    done, tokens, last = 0, 0, {}
    for step in range(args.steps):
        elapsed = time.perf_counter() - t0
        if world > 1:  # every rank stops at the same step
            flag = torch.tensor([float(elapsed > args.time_limit)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        else:
            stop = elapsed > args.time_limit
        if stop:
            break
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * lr_at(step, args, elapsed)
        teach, head, dec, enc, cu, index, after, y = make_batch(shards, rng, args, prefix, device)
        with torch.no_grad(), amp:
            teacher = model(input_ids=teach, use_cache=False, logits_to_keep=args.cont - 1).logits
        with amp:
            logits = net(enc, cu, index if config.chunk_order else None, head, dec, after=after)
        kl, ce, tce = losses(logits, teacher, y, args.temperature)
        loss = args.kl_weight * kl + args.ce_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        done = step + 1
        tokens += teach.numel() * world
        if writer and (step % args.log_every == 0 or step == args.steps - 1):
            secs = time.perf_counter() - t0
            ga = torch.stack([torch.tanh(b.attn_gate.detach()).abs() for b in adapter.cross]).mean().item()
            gm = torch.stack([torch.tanh(b.mlp_gate.detach()).abs() for b in adapter.cross]).mean().item()
            with torch.no_grad(), amp:  # the same batch read through another sample's memory
                other = losses(student(enc, cu, index if config.chunk_order else None, head, dec, shift=1,
                                       after=after),
                               teacher, y, args.temperature)[0].item() if args.batch > 1 else float("nan")
            last = dict(step=step, seconds=round(secs, 2), lr=opt.param_groups[0]["lr"], loss=loss.item(),
                        kl=kl.item(), ce=ce.item(), teacher_ce=tce.item(), gate_attn_mean=ga, gate_mlp_mean=gm,
                        tokens_per_s=round(tokens / secs), kl_other=other)
            writer.writerow(list(last.values()))
            log.flush()
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()),
                  flush=True)
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            save(out / "checkpoint.safetensors", step + 1)
    steps_done = done
    final = out / f"{name}.safetensors"
    save(final, steps_done)
    summary = {"adapter": str(final), "steps": steps_done, "train_seconds": round(time.perf_counter() - t0, 1),
               "wall_seconds": round(time.perf_counter() - t_start, 1), "tokens_seen": tokens, "world": world,
               "kernel": kernel, "last": last, "base": meta, "data": shards.manifest.get("sources"),
               "init": init, "args": vars(args)}
    if rank == 0:
        summary["adapter_bytes"] = final.stat().st_size
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"saved {final} ({summary['adapter_bytes'] / 2**20:.2f} MiB) after {steps_done} steps, "
              f"{summary['train_seconds']} s training, {summary['wall_seconds']} s wall", flush=True)
        log.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
