"""A stage maps only its own layers' bytes: measured on the file's mapping in this process."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from shardrt.gguf_file import GGUFFile
from shardrt.gguf_loader import LayerSpan, StageWeights
from shardrt.model import ModelConfig

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
# The kernel maps whole page-cache folios (up to 2 MiB) and fault-around windows, so pages within
# that distance of a span's edge can come along with it; nothing farther may.
FOLIO = 2 * MIB


def mapped_pages(path) -> tuple[int, list[bool]]:
    """Start address of this process's mapping of `path` (offset 0) and, per page, whether it is resident."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str(path) and int(fields[2], 16) == 0:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                break
        else:
            raise AssertionError(f"{path} is not mapped")
    n_pages = (end - start) // PAGE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(start // PAGE * 8)
        entries = struct.unpack(f"<{n_pages}Q", pagemap.read(n_pages * 8))
    return start, [bool(e >> 63) for e in entries]  # bit 63: page present


def resident_bytes(present: list[bool], lo: int = 0, hi: int | None = None) -> int:
    hi = len(present) * PAGE if hi is None else hi
    return sum(present[lo // PAGE : (hi + PAGE - 1) // PAGE]) * PAGE


@pytest.mark.parametrize("start,stop", [(20, 30), (10, 20)])
def test_stage_touches_only_its_own_bytes(demo_model, start, stop):
    with GGUFFile(demo_model) as gguf:
        cfg = ModelConfig.from_gguf(gguf)
        weights = StageWeights(gguf, cfg, LayerSpan.of(start, stop, cfg.n_layers))
        for name in weights.names:
            weights.load(name, torch.device("cpu"), torch.float32)
        _, present = mapped_pages(gguf.path.resolve())
        assert weights.bytes_read == weights.cover.covered_bytes

        needed = [gguf.tensors[n] for n in weights.names]
        needed_resident = sum(resident_bytes(present, t.offset, t.offset + t.n_bytes) for t in needed)
        assert needed_resident >= weights.cover.covered_bytes  # every byte it needs was really read
        others = [t for t in gguf.tensors.values() if t.name not in weights.names]
        assert sum(t.n_bytes for t in others) > 0.4 * gguf.file_size
        edges = [edge for span in weights.cover.spans for edge in span]
        far = [i for i in range((gguf.data_offset + FOLIO) // PAGE, len(present))  # past the parsed header
               if min(abs(i * PAGE - e) for e in edges) > FOLIO]
        far_bytes_of_others = [i for i in far if not any(a <= i * PAGE < b for a, b in weights.cover.spans)]
        assert len(far_bytes_of_others) * PAGE > 0.3 * gguf.file_size
        resident_far = [i * PAGE for i in far_bytes_of_others if present[i]]
        assert resident_far == [], f"{len(resident_far)} pages of other layers were read"
        others_resident = sum(resident_bytes(present, t.offset, t.offset + t.n_bytes) for t in others)
        assert others_resident <= 2 * FOLIO * len(edges)


def test_cover_numbers_for_thirds_of_the_demo_model(demo_model):
    with GGUFFile(demo_model) as gguf:
        cfg = ModelConfig.from_gguf(gguf)
        per_layer = sum(gguf.tensors[f"blk.10.{t}"].n_bytes for t in
                        ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                         "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"))
        embd = gguf.tensors["token_embd.weight"].n_bytes
        middle = StageWeights(gguf, cfg, LayerSpan.of(10, 20, 30)).cover
        last = StageWeights(gguf, cfg, LayerSpan.of(20, 30, 30)).cover
        assert middle.covered_bytes == 10 * per_layer
        assert middle.n_spans == 1
        # tied embeddings: the last stage needs token_embd as its head, far from its layers
        assert cfg.tied_embeddings
        assert last.covered_bytes == 10 * per_layer + embd + gguf.tensors["output_norm.weight"].n_bytes
        # file order is blk.0, blk.1, blk.10..19, blk.2, blk.20..29, ..., blk.9, output_norm; token_embd first
        assert last.n_spans == 3
        assert str(middle) == f"span cover {10 * per_layer / MIB:.1f} MiB of {gguf.file_size / MIB:.1f} MiB (1 spans)"
