"""Real text for calibration, evaluation and fine-tuning, all offline.

* CPython's own documentation (``pydoc_data.topics``), present with every CPython: the
  even-indexed topics calibrate, the odd-indexed ones are held out
  (:func:`calibration_and_heldout`), so the two never share a document.
* Two corpora on every Debian machine that calibration never sees (:func:`corpus`): the
  licence texts of ``/usr/share/common-licenses`` and the section-1 manual pages of
  ``/usr/share/man/man1`` (troff markup stripped).
"""
from __future__ import annotations

import glob
import os
from typing import List, Optional, Sequence, Tuple

import torch


def documentation_texts() -> List[str]:
    """CPython's topic documentation as a list of texts, in a fixed order."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


LICENSES_DIR = "/usr/share/common-licenses"
MAN1_DIR = "/usr/share/man/man1"
CORPORA = ("python-docs", "python-docs-even", "python-docs-odd", "licenses", "man")


def corpus(name: str, max_documents: Optional[int] = None) -> List[str]:
    """The texts of a named corpus, in a fixed order (:data:`CORPORA`). ``man``: manual
    pages sorted by file name, troff requests and escapes stripped."""
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")
    if name.startswith("python-docs"):
        texts = documentation_texts()
        texts = {"python-docs": texts, "python-docs-even": texts[0::2],
                 "python-docs-odd": texts[1::2]}[name]
    elif name == "licenses":
        seen, texts = set(), []
        for f in sorted(glob.glob(os.path.join(LICENSES_DIR, "*"))):
            real = os.path.realpath(f)
            if real in seen or not os.path.isfile(real):
                continue
            seen.add(real)
            with open(real, encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read())
    else:
        import gzip
        texts = []
        for f in sorted(glob.glob(os.path.join(MAN1_DIR, "*.gz"))):
            if max_documents is not None and len(texts) >= max_documents:
                break
            try:
                with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
                    raw = fh.read()
            except (OSError, EOFError):
                continue
            text = strip_troff(raw)
            if len(text) > 200 and not raw.startswith(".so "):  # skip redirect stubs
                texts.append(text)
    if not texts:
        raise ValueError(f"corpus {name!r} is empty on this machine")
    return texts[:max_documents] if max_documents else texts


# Inline troff escapes, most specific first: fonts (\fB, \f(CW, \f[I]), sizes (\s-1),
# dashes, named glyphs (\(aq), strings (\*(Aq), zero-width and spacing escapes.
_TROFF_ESCAPES = [(r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\[mM](\[[^\]]*\]|\(..|.)", ""),
                  (r"\\s[+-]?\d+", ""),
                  (r"\\\((em|en)", "-"), (r"\\\(..", ""), (r"\\\*(\(..|\[[^\]]*\]|.)", ""),
                  (r"\\-", "-"), (r"\\[&|^%:]", ""), (r"\\e", r"\\\\"), (r"\\ ", " "),
                  (r'\\"', "")]


def strip_troff(raw: str) -> str:
    """Plain text of a man page: comment lines and requests dropped (the text arguments of
    headings and font macros kept), inline escapes removed."""
    import re
    out = []
    for line in raw.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"^[.'](SH|SS|B|I|BR|IR|RB|RI|BI|IB|TP|IP)\s*(.*)$", line)
            if not m or not m.group(2):
                continue
            line = m.group(2).replace('"', "")
        for pat, rep in _TROFF_ESCAPES:
            line = re.sub(pat, rep, line)
        out.append(line)
    return "\n".join(out).strip()


def token_blocks(tokenizer, texts: Sequence[str], seq_len: int, n_blocks: int,
                 offset: int = 0) -> torch.Tensor:
    """``[n_blocks, seq_len]`` token ids: the texts concatenated, cut into blocks."""
    ids: List[int] = []
    need = (offset + n_blocks) * seq_len
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"not enough text for {n_blocks} blocks of {seq_len} tokens")
    ids_t = torch.tensor(ids[offset * seq_len:need], dtype=torch.long)
    return ids_t.view(n_blocks, seq_len)


def calibration_and_heldout(tokenizer, seq_len: int = 256, n_calib: int = 16,
                            n_heldout: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Disjoint calibration and held-out blocks: even-indexed topics calibrate, odd-indexed
    ones are held out, so the two never share a document."""
    texts = documentation_texts()
    calib = token_blocks(tokenizer, texts[0::2], seq_len, n_calib)
    held = token_blocks(tokenizer, texts[1::2], seq_len, n_heldout)
    return calib, held


def calibration_tokens(calibration, tokenizer=None, seq_len: int = 128,
                       n_blocks: int = 8) -> torch.Tensor:
    """Token blocks ``[n, seq_len]`` from a LongTensor, a list of token-id lists, or texts."""
    if isinstance(calibration, torch.Tensor):
        t = calibration
        if t.dim() == 1:
            t = t[: (t.numel() // seq_len) * seq_len].view(-1, seq_len)
        if t.dim() != 2 or t.dtype != torch.long or t.shape[0] == 0 or t.shape[1] < 2:
            raise ValueError("calibration tokens must be a non-empty LongTensor [n_blocks, seq_len]")
        return t
    if isinstance(calibration, (list, tuple)) and calibration:
        if all(isinstance(x, str) for x in calibration):
            if tokenizer is None:
                raise ValueError("calibration texts need tokenizer=...")
            return token_blocks(tokenizer, calibration, seq_len, n_blocks)
        if all(isinstance(x, (list, tuple)) for x in calibration):
            ids = [int(i) for x in calibration for i in x]
            return calibration_tokens(torch.tensor(ids, dtype=torch.long), None, seq_len)
    raise ValueError("calibration must be token ids (LongTensor or lists of ints) or a list of texts")
