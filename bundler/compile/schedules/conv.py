"""Direct 2-D convolution in NCHW, as Relax legalizes ONNX's Conv (topi's ``conv2d_nchw`` and
``group_conv2d_nchw``), with the elementwise epilogue FuseOps puts behind it (bias, ReLU,
residual add, clip, ...).

Three register tilings, all keeping the accumulators of one output tile in registers for the
whole reduction over input channels and the kernel window:

* **output channels in vector lanes** (regular convolutions, and grouped ones whose group has
  a whole tile of output channels): each step loads one packed weight vector per NR channels
  and broadcasts MR input pixels, so strides and dilations cost nothing (the input is only
  ever read as scalars). The weights are repacked at compile time from OIHW to
  ``[O/NR, I, H, W, NR]`` so that vector is contiguous; see :func:`pack_weights`.
* **channel blocks in vector lanes** (a depthwise convolution reading the ``[N, C/c, H, W, c]``
  tensor its producer was made to write by :mod:`bundler.compile.channelblocks`): each tap one
  contiguous load per block of channels, whatever the stride; the producer's output channel
  vectors are stored whole.
* **output pixels in vector lanes** (depthwise, and convolutions with too few output
  channels to fill a vector, like a detector's 1-channel head): each step loads a row of
  input pixels and broadcasts a weight.

The padded input (topi's ``pad_temp``) stays a separate, parallel stage: inlining it would put
bounds checks into the innermost loop.
"""

from __future__ import annotations

from tvm import tirx
from tvm.ir.expr import TensorLoad  # what a TIR buffer load is in TVM 0.27
from tvm.tirx import IndexMap
from tvm.tirx.analysis import undefined_vars

from .base import (
    UNROLL_BUDGET,
    CPURule,
    Knobs,
    as_int,
    column_stride,
    compute_stages_at,
    divisor_tile,
    is_var,
    layout_free_params,
    one_reduction,
    pack_weights,
    parallelize,
    param_index,
    product,
    pixel_tile_max,
    region_mins,
    register_tile,
    split_epilogue,
    tile_writeback,
    uses,
    vectorize_if_not,
)
from .cpu import CPU
from .elementwise import schedule_injective_block


def _fuse_pixels(sch, block, yx_vars, width: int) -> None:
    """Make a block iterate one pixel axis ``y * width + x`` instead of rows and columns
    (``yx_vars``: its row and column iterators; None: those indexing its output's last two
    dimensions)."""
    stmt = sch.get(block)
    ivs = [iv.var for iv in stmt.iter_vars]
    if yx_vars is None:
        mins = region_mins(stmt.writes[0])
        yx_vars = [mins[2], mins[3]] if len(mins) == 5 else [mins[-2], mins[-1]]
    iy = next(i for i, v in enumerate(ivs) if v.same_as(yx_vars[0]))
    ix = next(i for i, v in enumerate(ivs) if v.same_as(yx_vars[1]))

    def f(*v):
        out = []
        for i, e in enumerate(v):
            if i == iy:
                out.append(v[iy] * width + v[ix])
            elif i != ix:
                out.append(e)
        return tuple(out)

    sch.transform_block_layout(block, IndexMap.from_func(f, ndim=len(ivs)))


def _one_pixel_axis(sch, block, consumer, yx_vars, width: int, accumulator):
    """A 1x1 stride-1 convolution's rows and columns as one pixel axis ``y * width + x``, in its
    main block, the accumulator that block writes (``accumulator``: (n, c, pixel) -> its index)
    and the epilogue ``consumer``. Returns the main block's loops: batch (None when normalization
    dropped it), output channels, pixels, input channels."""
    sch.transform_layout(block, ("write", 0), lambda n, c, h, w: accumulator(n, c, h * width + w))
    _fuse_pixels(sch, block, list(yx_vars), width)
    _fuse_pixels(sch, consumer, None, width)
    loops = sch.get_loops(block)
    return loops if len(loops) == 4 else (None, *loops)


def channel_block(region) -> int | None:
    """c, when ``region`` is an access to a tensor in channel blocks ``[N, C/c, H, W, c]``
    (:mod:`bundler.compile.channelblocks`); else None."""
    if len(region.region) != 5:
        return None
    return as_int(region.source.shape[4])


def channel_blocked(c: int):
    """The index map from ``[N, C, H, W]`` to channel blocks ``[N, C/c, H, W, c]``."""
    return lambda n, ch, h, w: (n, ch // c, h, w, ch % c)


def _channel_var(region):
    """The block iterator of the channel an access to a channel-blocked tensor indexes."""
    (v,) = list(undefined_vars(region.region[4].min))
    return v


def _blocks_innermost(sch, block, var, c: int) -> None:
    """Make an injective ``block`` iterate its channel iterator ``var`` as ``var // c`` in its place
    and ``var % c`` innermost: the order of a channel-blocked tensor's memory, so that its innermost
    loop is contiguous there."""
    ivs = [iv.var for iv in sch.get(block).iter_vars]
    k = next(i for i, v in enumerate(ivs) if v.same_as(var))

    def f(*v):
        return (*[e // c if i == k else e for i, e in enumerate(v)], v[k] % c)

    sch.transform_block_layout(block, IndexMap.from_func(f, ndim=len(ivs)))


def _pad_apart(sch, pads, cpu: CPU) -> None:
    """Padding as a parallel stage of its own, before the convolution."""
    for b in pads:
        schedule_injective_block(sch, b, cpu)


def _is_copy(sch, block) -> bool:
    body = sch.get(block).body
    return isinstance(body, tirx.BufferStore) and isinstance(body.value, TensorLoad)


def _try_inline(sch, block) -> bool:
    try:
        sch.compute_inline(block)
        return True
    except Exception:  # noqa: BLE001 -- TVM refuses (the copy has other readers): keep the stage
        return False


def _roles(mins, names, iters):
    """Map the block iterators an access indexes plainly to the role of that position
    (``names``); a position indexed by the constant 0 (a unit dimension that normalization
    dropped) has no iterator; anything else is not the pattern."""
    out = {}
    for e, name in zip(mins, names):
        if isinstance(e, tirx.IntImm) and e.value == 0:
            continue
        hit = [i for i in iters if is_var(e, i.var)]
        if len(hit) != 1 or name is None:
            return None
        out[name] = hit[0]
    return out


class Conv2D(CPURule):
    """Matches a reduction block whose accesses are those of a 2-D NCHW convolution:
    ``out[n, f, y, x] += data[n, c(f, rc), y*s + ry*d, x*s + rx*d] * w[f, rc, ry, rx]``
    (after normalization, which drops unit loops: batch 1, 1x1 kernels, depthwise's one input
    channel per group)."""

    def schedule(self, func, target, cpu: CPU, knobs: Knobs):
        found = one_reduction(func)
        if found is None:
            return None
        sch, infos, k = found
        info = infos[k]
        block = info.block_rv
        stmt = sch.get(block)
        if len(stmt.reads) != 2 or len(stmt.writes) != 1 or "O" in info.dom_kind():
            return None
        iters = info.iters
        out = _roles(region_mins(stmt.writes[0]), ("n", "f", "y", "x"), iters)
        if out is None or len(stmt.writes[0].region) != 4:
            return None
        role = w_index = None
        for i, r in enumerate(stmt.reads):
            mins = region_mins(r)
            if len(mins) == 4 and r.source.dtype == stmt.writes[0].source.dtype:
                got = _roles(mins, ("f", "rc", "ry", "rx"), iters)
                if got is not None and got.get("f") is out.get("f"):
                    role, w_index = {**out, **got}, i
        if role is None:
            return None
        d_index = 1 - w_index
        data = region_mins(stmt.reads[d_index])
        if len(data) != 4:
            return None
        y, x = role.get("y"), role.get("x")
        if (y is not None and not uses(data[2], y.var)) or (x is not None and not uses(data[3], x.var)):
            return None
        # Every iterator has its role, the spatial ones spatial, the reduction ones reducing.
        if {id(i) for i in role.values()} != {id(i) for i in iters}:
            return None
        if any((r in ("rc", "ry", "rx")) != (i.kind == "R") for r, i in role.items()):
            return None
        if any(as_int(i.dom) is None for i in iters):
            return None
        wshape = [as_int(s) for s in stmt.reads[w_index].source.shape]
        oshape = [as_int(s) for s in stmt.writes[0].source.shape]
        OC, ICg, OW, N = wshape[0], wshape[1], oshape[3], oshape[0]
        IC = as_int(stmt.reads[d_index].source.shape[1])
        rc = role.get("rc")
        grouped = not ((rc is not None and is_var(data[1], rc.var)) or
                       (rc is None and isinstance(data[1], tirx.IntImm) and IC == 1))
        groups = IC // ICg if grouped else 1
        OCg = OC // groups

        # Stages before the convolution: topi's copy of an unpadded input is only inlined;
        # padding is scheduled by the tiling below (its own parallel loops, or per channel).
        pads = [b.block_rv for b in infos[:k]
                if not _is_copy(sch, b.block_rv) or not _try_inline(sch, b.block_rv)]

        lanes = cpu.lanes(stmt.writes[0].source.dtype.bits)
        w_param = param_index(func, stmt.reads[w_index].source)
        packable = w_param is not None and w_param in layout_free_params(func)
        loops = {r: i.loop_rv for r, i in role.items()}
        OH = oshape[2]
        pointwise = (not grouped and "ry" not in role and "rx" not in role and {"f", "y", "x", "rc"} <= set(role)
                     and is_var(data[2], role["y"].var) and is_var(data[3], role["x"].var))
        depthwise = grouped and ICg == 1
        # Channel blocks (bundler.compile.channelblocks): written by a convolution that keeps its
        # channels in lanes, read by a depthwise one that puts them there.
        out_block = channel_block(sch.get(infos[-1].block_rv).writes[0]) if k < len(infos) - 1 else None
        in_block = next((channel_block(r) for b in pads for r in sch.get(b).reads if channel_block(r)), None)
        if in_block is not None:
            if not (depthwise and lanes > 1 and in_block % lanes == 0 and {"f", "y", "x", "ry", "rx"} <= set(role)
                    and len(pads) == 1 and packable):
                return None
            return self._c_vector(sch, infos, k, loops, cpu, knobs, lanes, in_block, w_index, pads[0])
        if pointwise and lanes > 1 and out_block is None and register_tile(OH * OW, lanes) >= lanes:
            _pad_apart(sch, pads, cpu)
            return self._pointwise(sch, infos, k, role, cpu, knobs, lanes, OC, OH, OW)
        channels = OCg if grouped else OC
        nr = register_tile(channels, lanes)
        if lanes > 1 and nr >= max(4, lanes // 4) and not (grouped and ICg == 1) and "f" in loops:
            nrs = [t for t in (lanes // 2, lanes, 2 * lanes, 4 * lanes)
                   if t >= max(4, lanes // 4) and channels % t == 0 and pixel_tile_max(cpu, t, lanes) >= 2
                   and (out_block is None or t == out_block)]
            if out_block is not None:
                # One block per tile: tiles of two blocks ran slower (32->192 channels on 28x28,
                # AVX-512: 67 against 43 us).
                if out_block not in nrs:
                    return None
                nr = out_block
            # A 1x1 stride-1 convolution on a map too small for pixel vectors (7x7, 14x14) reads
            # and writes its pixels contiguously across rows: one pixel axis, so that the pixel
            # tile divides it (49 = 7 x 7, where rows of 7 left a tile of 6 and one of 1).
            # (A map that reaches this only for its channel-blocked output keeps its rows where the
            # block's pixel tile divides them well: indexing the input by one pixel axis costs a
            # division per scalar load, 16->96 channels on 112x112, AVX-512: 313 against 187 us.)
            most = pixel_tile_max(cpu, nr, lanes)
            wide = out_block is not None and 2 * divisor_tile(OW, most) > most
            fuse = pointwise and not knobs.pick("rows_apart", int(wide), (0, 1))
            if fuse:
                # Fewer channels per tile where that lets a pixel tile divide the map: on a 7x7
                # map one vector of channels by 7 pixels ran 1.5x faster than two by 6 and a
                # bounds-checked tile of 1 (1280x320 on 7x7, 2 threads, AVX2).
                P = OH * OW
                nr = next((t for t in sorted(nrs, reverse=True) if t <= nr
                           and 2 * divisor_tile(P, pixel_tile_max(cpu, t, lanes)) > pixel_tile_max(cpu, t, lanes)), nr)
            # Whole or half vector registers only (see register_tile), within the registers.
            nr = knobs.pick("nr", nr, nrs)
            return self._oc_vector(sch, infos, k, loops, cpu, knobs, lanes, nr, OW, w_index if packable else None, pads,
                                   fuse_pixels=(role["y"].var, role["x"].var) if fuse else None, out_block=out_block)
        if out_block is not None:
            return None
        if not (depthwise and lanes > 1 and {"f", "y", "x"} <= set(role) and OC * N >= 2 * cpu.threads):
            _pad_apart(sch, pads, cpu)
            pads = []
        strided = "x" in role and (column_stride(data[3], role["x"].var) or 1) > 1
        return self._ow_vector(sch, infos, k, loops, cpu, knobs, lanes, OC, OW, depthwise, pads, strided)

    @staticmethod
    def _oc_vector(sch, infos, k, loops, cpu: CPU, knobs: Knobs, lanes, nr, OW, w_index, pads=(), fuse_pixels=None,
                   out_block=None):
        block, consumer = split_epilogue(sch, infos, k)
        if out_block is not None:
            # The output in channel blocks: the write-back iterates them innermost, so that each
            # accumulator vector is stored whole.
            _blocks_innermost(sch, consumer, _channel_var(sch.get(consumer).writes[0]), out_block)
        if fuse_pixels is not None:
            OH = as_int(sch.get(loops["y"]).extent)
            n, f, p, rc = _one_pixel_axis(sch, block, consumer, fuse_pixels, OW, lambda b, c, q: (b, c // nr, q, c % nr))
            loops = {"f": f, "x": p, "rc": rc, **({"n": n} if n is not None else {})}
            OW = OH * OW
        OH = as_int(sch.get(loops["y"]).extent) if "y" in loops else 1
        pad_rows = knobs.pick("pad_rows", 0, [d for d in range(1, 9) if OH % d == 0]) if pads and "y" in loops else 0
        if not pad_rows:
            _pad_apart(sch, pads, cpu)
        if w_index is not None:
            pack_weights(sch, block, w_index, lambda o, i, h, w: (o // nr, i, h, w, o % nr))
        # The accumulator tile [MR pixels, NR channels] with the channels contiguous: one vector
        # register per NR/lanes channels of a pixel.
        if fuse_pixels is None:
            sch.transform_layout(block, ("write", 0), lambda b, c, h, w: (b, c // nr, h, w, c % nr))
        mr_max = pixel_tile_max(cpu, nr, lanes)
        fo, fi = sch.split(loops["f"], [None, nr])
        xo = xi = None
        if "x" in loops:
            mr = divisor_tile(OW, mr_max)
            # A pixel tile that does not divide the width is cheaper with a bounds check than
            # single pixels: the check is on the unrolled loop, not the vector one.
            mr = knobs.pick("mr", mr if mr * 2 > mr_max or mr == OW else mr_max, range(2, min(mr_max, OW) + 1))
            xo, xi = sch.split(loops["x"], [None, mr])
        # Channel tiles outside rows (a weight panel stays in cache for every row) or rows outside
        # channel tiles (an input row stays in cache for every channel tile).
        red = [loops[r] for r in ("rc", "ry", "rx") if r in loops]
        if pad_rows:
            # Padding computed for a few output rows at a time, right before the channel tiles
            # that read it (the rows of the window overlap: a few rows padded twice).
            yo, yi = sch.split(loops["y"], [None, pad_rows])
            par = [lp for lp in (loops.get("n"), yo) if lp is not None]
            sch.reorder(*par, fo, yi, *([xo] if xo else []), *red, *([xi] if xi else []), fi)
            fused = parallelize(sch, par, cpu)
            compute_stages_at(sch, pads, fused, lanes)
            at = xo or yi
        else:
            rows_first = knobs.pick("rows_first", 0, (0, 1))
            outer = [lp for lp in ((loops.get("n"), loops.get("y"), fo) if rows_first else (loops.get("n"), fo, loops.get("y")))
                     if lp is not None]
            sch.reorder(*outer, *([xo] if xo else []), *red, *([xi] if xi else []), fi)
            if xo is not None and product(as_int(sch.get(lp).extent) or 1 for lp in outer) < 4 * cpu.threads:
                # Too few channel tiles (and rows) to share out evenly (3 tiles on 2 threads: one
                # idles a third of the time): the pixel tiles in parallel too.
                outer.append(xo)
                xo = None
            fused = parallelize(sch, outer, cpu)
            at = xo or fused
        sch.reverse_compute_at(consumer, at, preserve_unit_loops=True)
        # Loop kinds before decomposing the reduction: the update block alone is no longer a
        # reduction block that vectorize/unroll accept; the init loops are copied with them.
        sch.vectorize(fi)
        if xi is not None:
            sch.unroll(xi)
        init = sch.decompose_reduction(block, red[0])
        vectorize_if_not(sch, init, lanes)
        # Write-back: the output is NCHW, so pixels are contiguous there; the transposition
        # from the channel-vector accumulators is left to LLVM on the unrolled tile.
        tile_writeback(sch, consumer, at, lanes)
        return sch

    @staticmethod
    def _c_vector(sch, infos, k, loops, cpu: CPU, knobs: Knobs, lanes, c, w_index, pad):
        """A depthwise convolution reading channel blocks: a block of ``c`` channels in vector
        lanes, a row of output pixels per register tile, each tap one contiguous load and a
        multiply-add whatever the stride (against a load and a shuffle per tap with pixels in
        lanes). The padding is computed per block and band of rows, right before the rows that
        read it, in channel blocks too."""
        block, consumer = split_epilogue(sch, infos, k)
        _blocks_innermost(sch, pad, region_mins(sch.get(pad).writes[0])[1], c)
        sch.transform_layout(pad, ("write", 0), channel_blocked(c))
        pack_weights(sch, block, w_index, lambda o, i, h, w: (o // c, i, h, w, o % c))
        sch.transform_layout(block, ("write", 0), channel_blocked(c))
        OH, OW = (as_int(sch.get(loops[r]).extent) for r in ("y", "x"))
        fo, fi = sch.split(loops["f"], [None, c])
        mr = knobs.pick("pixels", divisor_tile(OW, pixel_tile_max(cpu, c, lanes)), [d for d in range(2, 9) if OW % d == 0])
        xo, xi = sch.split(loops["x"], [None, mr])
        # Bands of rows per parallel task: the padded band is recomputed where the windows of two
        # bands overlap, so a band of a few rows, enough for the two threads to share the blocks.
        band = knobs.pick("band", divisor_tile(OH, 8), [d for d in range(1, 17) if OH % d == 0])
        yo, yi = sch.split(loops["y"], [None, band])
        outer = [lp for lp in (loops.get("n"), fo, yo) if lp is not None]
        sch.reorder(*outer, yi, xo, loops["ry"], loops["rx"], xi, fi)
        fused = parallelize(sch, outer, cpu)
        compute_stages_at(sch, [pad], fused, lanes)
        sch.reverse_compute_at(consumer, xo, preserve_unit_loops=True)
        sch.vectorize(fi)
        budget = UNROLL_BUDGET
        for lp in (xi, loops["rx"], loops["ry"]):
            e = as_int(sch.get(lp).extent)
            if e is not None and e <= budget:
                sch.unroll(lp)
                budget //= e
        init = sch.decompose_reduction(block, loops["ry"])
        vectorize_if_not(sch, init, lanes)
        tile_writeback(sch, consumer, xo, lanes)
        return sch

    @staticmethod
    def _pointwise(sch, infos, k, role, cpu: CPU, knobs: Knobs, lanes, OC, OH, OW):
        """A 1x1 stride-1 convolution is the matrix product W[OC, IC] x X[IC, H*W]: pixels of
        all rows in vector lanes (X and the output are contiguous along them), a few output
        channels per tile broadcasting their weights. Rows and columns are fused into one pixel
        axis first, so a 7x7 or 14x14 map still fills whole vectors."""
        block, consumer = split_epilogue(sch, infos, k)
        *outer, f, p, rc = _one_pixel_axis(sch, block, consumer, (role["y"].var, role["x"].var), OW,
                                           lambda n, c, q: (n, c, q))
        t = register_tile(OH * OW, lanes)
        t = knobs.pick("pixels", t, [x for x in (lanes // 2, lanes, 2 * lanes, 4 * lanes)
                                     if x >= 4 and (OH * OW) % x == 0 and pixel_tile_max(cpu, x, lanes) >= 2])
        most = pixel_tile_max(cpu, t, lanes)
        ft = knobs.pick("channels", divisor_tile(OC, most), [d for d in range(2, most + 1) if OC % d == 0])
        fo, fi = sch.split(f, [None, ft])
        po, pi = sch.split(p, [None, t])
        outer = [lp for lp in outer if lp is not None]
        # X's panel (IC x t pixels) stays in L1 while every channel tile reads it; or (knob) a
        # channel tile's weights (IC x ft) stay there while every pixel tile reads them.
        if knobs.pick("channels_first", 0, (0, 1)):
            sch.reorder(*outer, fo, po, rc, fi, pi)
            parallelize(sch, [*outer, fo], cpu)
            at = po
        else:
            sch.reorder(*outer, po, fo, rc, fi, pi)
            parallelize(sch, [*outer, po], cpu)
            at = fo
        sch.reverse_compute_at(consumer, at, preserve_unit_loops=True)
        sch.vectorize(pi)
        sch.unroll(fi)
        init = sch.decompose_reduction(block, rc)
        vectorize_if_not(sch, init, lanes)
        tile_writeback(sch, consumer, at, lanes)
        return sch

    @staticmethod
    def _ow_vector(sch, infos, k, loops, cpu: CPU, knobs: Knobs, lanes, OC, OW, depthwise: bool, pads=(),
                   strided: bool = False):
        block, consumer = split_epilogue(sch, infos, k)
        # A depthwise convolution pads one channel at a time, right before the rows that read it,
        # into a buffer that stays in L2, instead of writing the whole padded input to memory
        # and reading it back (MobileNetV2's 32x112x112 layer, 2 threads: 74 against 109 us).
        # (Stored deinterleaved for stride 2, even columns then odd ones, the taps read contiguous
        # vectors instead of shuffles; but even with the copy split from the padding
        # (decompose_padding) so that TVM vectorizes it, that ran slower: 96x112x112, 2 threads,
        # AVX-512, 133-231 against 129-139 us; 192x28x28 38 against 23-34.)
        local_pad = bool(pads) and not knobs.pick("pad_apart", 0, (0, 1))
        if not local_pad:
            _pad_apart(sch, pads, cpu)
        # A power-of-two tile (see register_tile); only when the width has none worth having
        # (7, 14) a whole row, as one odd-sized vector.
        t = register_tile(OW, lanes)
        if lanes > 1 and t < 4:
            t = divisor_tile(OW, 2 * lanes, lanes)
        xo = xi = fo = fi = None
        if "x" in loops:
            t = knobs.pick("pixels", t, [x for x in (lanes // 2, lanes, 2 * lanes) if x >= 2 and OW % x == 0]
                           + ([OW] if OW <= 4 * max(lanes, 1) else []))
            xo, xi = sch.split(loops["x"], [None, t])
        if "f" in loops:
            # Channels that share the input pixels they read (not so in a depthwise convolution)
            # are computed together, a few rows of vectors each.
            ft = 1 if depthwise else knobs.pick("channels", divisor_tile(OC, 4), [d for d in range(1, 9) if OC % d == 0])
            fo, fi = sch.split(loops["f"], [None, ft])
        yo = yi = None
        if "y" in loops and depthwise:
            # A depthwise tile of several output rows instead: rows y..y+7 read input rows that
            # overlap by KH-1, and LLVM loads each only once within the unrolled tile. (Measured
            # on MobileNetV2's maps, 2 threads: 7 or 8 rows ran 1.1-4x faster than 4, most on the
            # 7x7 and 14x14 maps, where 4 rows left one or two.) As many rows as the accumulators
            # fit in registers: 8 rows of two vectors on AVX2's 16 registers spilled (32x112x112,
            # 2 threads, Zen 1: 450 us against 285 for 4 rows; all of MobileNetV2 4% faster).
            OH = as_int(sch.get(loops["y"]).extent)
            rows = pixel_tile_max(cpu, t, lanes) if lanes > 1 else 8
            yt = knobs.pick("rows", divisor_tile(OH, rows), [d for d in range(1, 9) if OH % d == 0])
            yo, yi = sch.split(loops["y"], [None, yt])
        outer = [lp for lp in (loops.get("n"), fo, yo or loops.get("y")) if lp is not None]
        red = [loops[r] for r in ("rc", "ry", "rx") if r in loops]
        inner = [lp for lp in (fi, yi, xi) if lp is not None]
        sch.reorder(*outer, *([xo] if xo else []), *red, *inner)
        if local_pad:
            # Parallel over channels only: the rows of a channel share its padded plane.
            rows = outer.pop()
            fused = parallelize(sch, outer, cpu)
            compute_stages_at(sch, pads, fused, lanes)
            if xo is None:
                fused = rows
        else:
            fused = parallelize(sch, outer, cpu)
        at = xo or fused
        if at is not None:
            sch.reverse_compute_at(consumer, at, preserve_unit_loops=True)
        if xi is not None:
            # Strided pixels in vectors too: their loads of every other input pixel become a
            # contiguous load and a shuffle (bundler.compile.lowering). MobileNetV2's stride-2
            # depthwise layers, 2 threads, against unrolled pixels left to LLVM's SLP vectorizer
            # (the knob unroll_strided): 181 against 208 us at 96x112x112, 54 against 65 at
            # 144x56x56, 22 against 28 at 192x28x28, 18 against 25 at 576x14x14.
            if lanes > 1 and t > 1 and not (strided and knobs.pick("unroll_strided", 0, (0, 1))):
                sch.vectorize(xi)
            else:
                sch.unroll(xi)
        # Unrolled from the inside out while the copies stay within the budget.
        budget = UNROLL_BUDGET
        for lp in (fi, yi, loops.get("rx"), loops.get("ry") if depthwise else None):
            e = as_int(sch.get(lp).extent) if lp is not None else None
            if e is not None and e <= budget:
                sch.unroll(lp)
                budget //= e
        init = sch.decompose_reduction(block, red[0])
        vectorize_if_not(sch, init, lanes)
        tile_writeback(sch, consumer, at, lanes)
        return sch
