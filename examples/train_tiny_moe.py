"""Train the bundled example model: a small Mixtral-architecture MoE on real English text.

The corpus is Debian's `fortunes` package (about 4.9 MB of English quotations, jokes and
verse under /usr/share/games/fortunes): real text that is on disk offline, nothing downloaded.

    apt-get install fortunes
    python examples/train_tiny_moe.py --out examples/tiny-moe --steps 1500

Writes a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json), heldout.txt (the held-out documents) and
CARD.md with the corpus, steps and the held-out loss. Routing in a trained model is what makes expert prediction measurable, so the
router gets the usual load-balancing auxiliary loss: experts are used, not collapsed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM

CORPUS_DIR = Path("/usr/share/games/fortunes")
EOS = "<|endoftext|>"


def read_fortunes(corpus_dir: Path) -> list[str]:
    """Every fortune cookie of every English file, as one document each."""
    if not corpus_dir.is_dir():
        raise SystemExit(f"{corpus_dir} not found: install Debian's 'fortunes' package")
    docs: list[str] = []
    for path in sorted(corpus_dir.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file():
            continue  # skip .dat indexes, .u8 links
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.extend(d.strip() for d in text.split("\n%\n") if d.strip())
    return docs


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def token_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        yield torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model: MixtralForCausalLM, stream: torch.Tensor, seq_len: int) -> float:
    model.eval()
    losses = []
    for start in range(0, len(stream) - seq_len, seq_len):
        chunk = stream[start : start + seq_len].unsqueeze(0)
        losses.append(model(input_ids=chunk, labels=chunk).loss.item())
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("examples/tiny-moe"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    docs = read_fortunes(CORPUS_DIR)
    random.Random(args.seed).shuffle(docs)
    n_val = max(1, len(docs) // 50)
    val_docs, train_docs = docs[:n_val], docs[n_val:]
    tok = train_tokenizer(train_docs, args.vocab)
    train_ids, val_ids = token_stream(tok, train_docs), token_stream(tok, val_docs)
    print(f"{len(docs)} documents; {len(train_ids)} train tokens, {len(val_ids)} held-out tokens")

    eos = tok.token_to_id(EOS)
    config = MixtralConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
    )
    model = MixtralForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step, batch in zip(range(args.steps), batches(train_ids, args.seq_len, args.batch, gen)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)

    val_loss = held_out_loss(model, val_ids, args.seq_len)
    print(f"held-out loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f})")

    model.config.output_router_logits = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save(str(args.out / "tokenizer.json"))
    (args.out / "heldout.txt").write_text("\n\n".join(val_docs) + "\n", encoding="utf-8")
    (args.out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
         "model_max_length": config.max_position_embeddings}, indent=2) + "\n")
    (args.out / "CARD.md").write_text(
        f"# tiny-moe: the bundled example model\n\n"
        f"- Architecture: MixtralForCausalLM, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_local_experts} experts per layer, top-{config.num_experts_per_tok}, "
        f"expert intermediate {config.intermediate_size}, {config.num_attention_heads} heads "
        f"({config.num_key_value_heads} KV heads).\n"
        f"- Tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens, trained on the same training split.\n"
        f"- Corpus: Debian package `fortunes` ({len(docs)} documents; {len(train_ids)} training tokens, "
        f"{len(val_ids)} held-out tokens: a random 2% of the documents, seed {args.seed}).\n"
        f"- Training: {args.steps} steps of {args.batch}x{args.seq_len} tokens, AdamW, peak lr {args.lr}, "
        f"load-balancing loss {config.router_aux_loss_coef}; {time.time() - start:.0f} s on 2 CPU cores.\n"
        f"- Held-out loss {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}).\n"
        f"- Reproduce: `python examples/train_tiny_moe.py --out examples/tiny-moe --steps {args.steps}`.\n"
    )


if __name__ == "__main__":
    main()
