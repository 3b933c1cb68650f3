"""Train the small demo model that lrc ships (models/lrc-demo-llama), reproducibly, on 2 CPU cores.

    python scripts/train_demo_model.py --out models/lrc-demo-llama

Design (why it looks like this): tiny models trained briefly are very robust to compression because most of
the prediction sits in large-vocabulary embeddings. To make compression differences visible, the demo model
uses a small byte-level BPE vocabulary (1024), relatively many layers for its width, a high learning rate and
weight decay, so the decoder layers carry the prediction. Llama architecture with GQA (4 heads, 2 KV heads).

Everything is seeded and the step count is fixed (not time-based), so the same command gives the same
weights on the same torch build. The whole run takes about 19 minutes on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "calibration"


def train_tokenizer(text: str, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return fast


def perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, 8):
            batch = windows[i : i + 8]
            logits = model(batch).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += batch[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "models" / "lrc-demo-llama")
    p.add_argument("--steps", type=int, default=540)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_text = (CALIB / "train.txt").read_text(encoding="utf-8")
    valid_text = (CALIB / "valid.txt").read_text(encoding="utf-8")
    tok = train_tokenizer(train_text, args.vocab, args.out)
    train_ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    valid_ids = torch.tensor(tok(valid_text)["input_ids"], dtype=torch.long)
    print(f"tokens: train {train_ids.numel():,}  valid {valid_ids.numel():,}", flush=True)

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seqlen,  # the trained context: lrc eval defaults to it
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    max_start = train_ids.numel() - args.seqlen - 1
    log, t0 = [], time.time()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, max_start, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seqlen] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.time() - t0
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {elapsed:7.1f}s", flush=True)
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(elapsed, 1)})

    valid_ppl = perplexity(model, valid_ids, args.seqlen)
    print(f"valid perplexity ({args.seqlen}-token windows): {valid_ppl:.2f}", flush=True)
    model = model.to(torch.bfloat16)
    model.save_pretrained(args.out)
    (args.out / "training_log.json").write_text(
        json.dumps(
            {
                "settings": vars(args) | {"out": str(args.out)},
                "parameters": n_params,
                "train_seconds": round(time.time() - t0, 1),
                "valid_ppl_fp32_256": round(valid_ppl, 3),
                "torch": torch.__version__,
                "log": log,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
