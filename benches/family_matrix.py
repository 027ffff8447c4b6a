"""Every family of the family matrix test (tests/qra_kernels/integrations/test_families.py),
tiny and random: how much is stored packed and how far the outputs move, through
``from_pretrained(..., quantization_config=QraConfig(bits, group_size=32))``.

Columns: quantized layers + expert groups (``len(config.quantization_config.layer_bits)``),
the share of Linear / Conv1D / routed-expert weights stored packed (head excluded), the
relative error of the logits (BERT: hidden states) at 8 and 4 bits against float, and for the
MoE families the packed share when the routed experts are kept float
(``modules_to_not_convert=["lm_head", "experts"]``), i.e. what issue 14 found before experts
were quantized.

Run from the repository root, under the CPU lock (about a minute on 2 cores):
``flock /tmp/cpu.lock python benches/family_matrix.py``. Prints a Markdown table.
"""
import logging
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's qra_kernels and tests, not installed ones
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import qra_kernels as qk  # noqa: E402
from tests.qra_kernels.integrations.test_families import (FAMILIES, MOE, auto_class,  # noqa: E402
                                                          build, coverage, output, rel_err)


def main():
    torch.set_num_threads(2)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print("| family | layers + expert groups | share packed | 8-bit rel. err | 4-bit rel. err "
          "| share packed, experts kept float |")
    print("|---|---|---|---|---|---|")
    for family in FAMILIES:
        model = build(family)
        ref = output(model, family)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            row = {}
            for bits in (8, 4):
                q = auto_class(family).from_pretrained(
                    d, quantization_config=qk.QraConfig(bits=bits, group_size=32)).eval()
                row[bits] = (coverage(q), rel_err(output(q, family), ref),
                             len(q.config.quantization_config.layer_bits))
            skip = "—"
            if family in MOE:
                q = auto_class(family).from_pretrained(d, quantization_config=qk.QraConfig(
                    bits=4, group_size=32, modules_to_not_convert=["lm_head", "experts"]))
                skip = f"{100 * coverage(q):.1f}%"
        print(f"| {family} | {row[8][2]} | {100 * row[8][0]:.1f}% | {row[8][1]:.2e} "
              f"| {row[4][1]:.2e} | {skip} |")


if __name__ == "__main__":
    main()
