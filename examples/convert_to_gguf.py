"""Convert a checkpoint to GGUF with llama.cpp's own converter, for the peer benchmark.

    python examples/convert_to_gguf.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf [--outtype f16]

LLAMA_CPP_DIR holds llama.cpp's convert_hf_to_gguf.py (e.g. vendor/llama.cpp of the llama-cpp-python
source distribution). llama.cpp recognizes a BPE tokenizer's pre-tokenizer by hashing how it splits a
test text with that vocabulary, so a tokenizer trained here is never recognized ("BPE pre-tokenizer was
not recognized"). The bundled example's tokenizer is a GPT-2-style byte-level BPE (tokenizers'
ByteLevel pre-tokenizer with GPT-2's regex), which is llama.cpp's "gpt-2" pre-tokenizer: this script
says so when the hash is unknown and the tokenizer is of that kind, and refuses otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def gpt2_byte_level(model_dir: Path) -> bool:
    pre = json.loads((model_dir / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def main() -> None:
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    llama_dir, model_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    sys.path.insert(0, str(llama_dir))
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", out, *sys.argv[4:]]
    import convert_hf_to_gguf
    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if gpt2_byte_level(model_dir):
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
