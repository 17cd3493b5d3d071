"""Rotated-box geometry in pure PyTorch: the le90 convention, polygon conversions, minimum-area rectangles,
rotated IoU by convex polygon clipping, rotated NMS and exact flip / 90° rotation of rotated boxes.

Conventions (docs/tasks/oriented.md §1):

* **Coordinates** are continuous pixel coordinates, ``x`` to the right and ``y`` down; pixel ``(row i, col j)``
  covers ``[j, j+1) × [i, i+1)``, so its centre is ``(j + 0.5, i + 0.5)``.
* **Rotated box** ``(cx, cy, w, h, θ)``: centre, the side along direction ``(cos θ, sin θ)`` has length ``w``, the
  side along ``(-sin θ, cos θ)`` has length ``h``. With ``y`` down, a positive θ turns the ``w`` side clockwise on
  screen.
* **le90** (mmrotate's ``le90``, ``mmrotate/core/bbox/transforms.py``: ``poly2obb_np_le90`` and ``norm_angle``):
  ``w >= h`` (``w`` is the long side) and ``θ ∈ [-π/2, π/2)``. A box with ``w < h`` is turned into
  ``(cx, cy, h, w, θ + π/2)`` and every angle is wrapped by ``(θ + π/2) mod π - π/2``; so an axis-aligned box
  taller than wide has ``θ = -π/2`` (as mmrotate's ``hbb2obb_le90``). A square keeps its angle modulo π: its two
  le90 forms ``θ`` and ``θ ± π/2`` describe the same box (mmrotate does not break this tie either).
* **Corner order** of :func:`rbox_to_poly` (mmrotate's ``obb2poly_le90``): the box-local corners
  ``(-w/2, -h/2), (w/2, -h/2), (w/2, h/2), (-w/2, h/2)`` rotated by θ and moved to the centre; for ``θ = 0`` that is
  top-left, top-right, bottom-right, bottom-left on screen, and the shoelace area ``½ Σ (x_k y_{k+1} − x_{k+1} y_k)``
  of the corners is ``+w·h`` for every θ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

HALF_PI = math.pi / 2

# Below this many pairs a pairwise IoU is computed in one go; above it, in row chunks of about this many pairs
# (each pair holds 24 candidate points and a few [4, 4] edge tables: ~1 KiB in float32).
_PAIR_CHUNK = 1 << 18


# ------------------------------------------------------------------------------------------------- conventions
def norm_angle_le90(theta: Tensor) -> Tensor:
    """Wrap angles into ``[-π/2, π/2)``: ``(θ + π/2) mod π − π/2`` (mmrotate's ``norm_angle(·, 'le90')``).

    Args:
        theta: angles in radians, any shape.

    Returns:
        Wrapped angles, same shape and dtype.
    """
    wrapped = torch.remainder(theta + HALF_PI, math.pi) - HALF_PI
    # Rounding can put the result a hair outside: remainder(x, π) may round up to π (θ == π/2), and subtracting
    # π/2 may land just below -π/2. Fold both back into the half-open interval.
    wrapped = torch.where(wrapped >= HALF_PI, wrapped - math.pi, wrapped)
    return torch.where(wrapped < -HALF_PI, wrapped + math.pi, wrapped)


def regularize_rboxes(rboxes: Tensor) -> Tensor:
    """Bring any ``(cx, cy, w, h, θ)`` into le90: ``|w|, |h|``, then ``w >= h`` by swapping the sides and adding
    π/2 to θ when ``w < h``, then θ wrapped into ``[-π/2, π/2)``. The rectangle described is unchanged.

    Follows mmrotate ``poly2obb_np_le90`` (swap when ``w < h``, then wrap), ``mmrotate/core/bbox/transforms.py``.

    Args:
        rboxes: ``[..., 5]``.

    Returns:
        ``[..., 5]`` le90 boxes.
    """
    cx, cy, w, h, t = rboxes.unbind(-1)
    w, h = w.abs(), h.abs()
    swap = w < h
    w2 = torch.where(swap, h, w)
    h2 = torch.where(swap, w, h)
    t2 = norm_angle_le90(torch.where(swap, t + HALF_PI, t))
    return torch.stack([cx, cy, w2, h2, t2], dim=-1)


# ------------------------------------------------------------------------------------------------- conversions
def rbox_to_poly(rboxes: Tensor) -> Tensor:
    """Corners of rotated boxes, in the documented order (module docstring; mmrotate ``obb2poly_le90``).

    Args:
        rboxes: ``[..., 5]`` ``(cx, cy, w, h, θ)`` (any angle convention: the corners follow the numbers given).

    Returns:
        ``[..., 4, 2]`` corners ``c − u − v, c + u − v, c + u + v, c − u + v`` with ``u = w/2 (cos θ, sin θ)``,
        ``v = h/2 (−sin θ, cos θ)``.
    """
    cx, cy, w, h, t = rboxes.unbind(-1)
    cos, sin = torch.cos(t), torch.sin(t)
    ux, uy = 0.5 * w * cos, 0.5 * w * sin
    vx, vy = -0.5 * h * sin, 0.5 * h * cos
    xs = torch.stack([cx - ux - vx, cx + ux - vx, cx + ux + vx, cx - ux + vx], dim=-1)
    ys = torch.stack([cy - uy - vy, cy + uy - vy, cy + uy + vy, cy - uy + vy], dim=-1)
    return torch.stack([xs, ys], dim=-1)


def rbox_to_hbb(rboxes: Tensor) -> Tensor:
    """Axis-aligned envelope of rotated boxes (mmrotate ``obb2xyxy_le90``).

    Args:
        rboxes: ``[..., 5]``.

    Returns:
        ``[..., 4]`` ``(x1, y1, x2, y2)``.
    """
    cx, cy, w, h, t = rboxes.unbind(-1)
    cos, sin = torch.cos(t).abs(), torch.sin(t).abs()
    dx = 0.5 * (w * cos + h * sin)
    dy = 0.5 * (w * sin + h * cos)
    return torch.stack([cx - dx, cy - dy, cx + dx, cy + dy], dim=-1)


def hbb_to_rbox(boxes: Tensor) -> Tensor:
    """Axis-aligned ``(x1, y1, x2, y2)`` boxes as le90 rotated boxes (mmrotate ``hbb2obb_le90``: a box taller than
    wide gets ``θ = −π/2``).

    Args:
        boxes: ``[..., 4]``.

    Returns:
        ``[..., 5]``.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    rb = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, torch.zeros_like(x1)], dim=-1)
    return regularize_rboxes(rb)


def rbox_area(rboxes: Tensor) -> Tensor:
    """``w·h`` of ``[..., 5]`` boxes → ``[...]`` (negative sides count by their length)."""
    return rboxes[..., 2].abs() * rboxes[..., 3].abs()


def min_area_rect(points: Tensor) -> Tensor:
    """Minimum-area enclosing rectangle of point sets, as le90 rotated boxes (no OpenCV).

    The optimal rectangle has a side collinear with an edge of the convex hull (Freeman & Shapira, "Determining the
    minimum-area encasing rectangle for an arbitrary closed curve", CACM 1975). Every hull edge joins two of the
    points, so the rectangles aligned with the directions of all point pairs (plus the x axis, for point sets that
    collapse to one point) include the optimum: the batched search projects every point on every candidate
    direction and keeps the smallest area (first one on ties). ``O(N³)`` per set, meant for polygons of a few to a
    few dozen vertices (DOTA's quadrilaterals: 6 directions). Degenerate sets give ``h = 0`` (collinear points) or
    ``w = h = 0`` (one point).

    Args:
        points: ``[..., N, 2]`` with ``N >= 1``; the order and convexity of the points do not matter.

    Returns:
        ``[..., 5]`` le90 boxes.
    """
    n = points.shape[-2]
    centre = points.mean(dim=-2, keepdim=True)
    pts = points - centre  # centring keeps the projections well conditioned far from the origin
    i, j = torch.triu_indices(n, n, offset=1, device=points.device)
    dirs = pts[..., j, :] - pts[..., i, :]  # [..., P, 2]
    axis = torch.zeros_like(pts[..., :1, :])
    axis[..., 0] = 1.0
    dirs = torch.cat([dirs, axis], dim=-2)
    length = dirs.norm(dim=-1, keepdim=True)
    scale = pts.abs().amax(dim=(-2, -1), keepdim=True)  # [..., 1, 1]
    usable = length > 1e-9 * scale.clamp_min(torch.finfo(pts.dtype).tiny)
    u = dirs / torch.where(usable, length, torch.ones_like(length))
    v = torch.stack([-u[..., 1], u[..., 0]], dim=-1)
    pu = pts @ u.transpose(-1, -2)  # [..., N, P+1]
    pv = pts @ v.transpose(-1, -2)
    umin, umax = pu.amin(dim=-2), pu.amax(dim=-2)
    vmin, vmax = pv.amin(dim=-2), pv.amax(dim=-2)
    area = (umax - umin) * (vmax - vmin)
    usable = usable.squeeze(-1)
    usable[..., -1] = True  # the x axis is always a valid direction
    area = torch.where(usable, area, torch.full_like(area, math.inf))
    k = area.argmin(dim=-1, keepdim=True)

    def pick(x: Tensor) -> Tensor:
        return x.gather(-1, k).squeeze(-1)

    uk = u.gather(-2, k.unsqueeze(-1).expand(*k.shape[:-1], 1, 2)).squeeze(-2)
    vk = torch.stack([-uk[..., 1], uk[..., 0]], dim=-1)
    a_mid = 0.5 * (pick(umin) + pick(umax))
    b_mid = 0.5 * (pick(vmin) + pick(vmax))
    c = centre.squeeze(-2) + a_mid.unsqueeze(-1) * uk + b_mid.unsqueeze(-1) * vk
    w = pick(umax) - pick(umin)
    h = pick(vmax) - pick(vmin)
    theta = torch.atan2(uk[..., 1], uk[..., 0])
    return regularize_rboxes(torch.stack([c[..., 0], c[..., 1], w, h, theta], dim=-1))


def poly_to_rbox(polys: Tensor) -> Tensor:
    """DOTA-style polygons ``[..., 8]`` ``(x1, y1, …, x4, y4)`` or ``[..., N, 2]`` → le90 boxes ``[..., 5]`` via
    :func:`min_area_rect` (the rule of mmrotate ``poly2obb_np_le90``, which calls ``cv2.minAreaRect``)."""
    if polys.shape[-1] != 2:
        polys = polys.reshape(*polys.shape[:-1], -1, 2)
    return min_area_rect(polys)


# ------------------------------------------------------------------------------------------------- IoU
def _cross(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _inside(p: Tensor, box: Tensor, cos: Tensor, sin: Tensor, slack: Tensor) -> Tensor:
    """Whether points ``p [..., K, 2]`` lie in the rotated boxes ``box [..., 5]`` (``cos``, ``sin`` of their angles,
    ``[..., 1]``), up to ``slack [..., 1]`` (a distance). Tested in the box's own frame — not with differences of its
    corners, which lose the precision of a long thin box's short side."""
    d = p - box[..., None, :2]
    lu = d[..., 0] * cos + d[..., 1] * sin
    lv = d[..., 1] * cos - d[..., 0] * sin
    return (lu.abs() <= 0.5 * box[..., 2:3].abs() + slack) & (lv.abs() <= 0.5 * box[..., 3:4].abs() + slack)


def _convex_intersection_area(a: Tensor, b: Tensor, tol: float) -> Tensor:
    """Area of the intersection of rotated boxes ``[..., 5]`` (same shape).

    Candidate vertices: the corners of each box inside the other and the crossings of the lines of their edges
    (4 × 4) that lie inside both boxes; the intersection of two convex polygons is the convex hull of these. A point
    counts as inside up to a slack of ``tol`` times the largest side of the pair, so boundary points (shared
    corners, touching and collinear edges) are kept whatever the rounding. Testing crossings for membership of
    both boxes, rather than their parameters along the edges, also makes nearly parallel edges harmless: an
    ill-conditioned crossing is either a genuine boundary point or rejected. The valid candidates are sorted by
    angle around their mean and the area is the shoelace sum; invalid slots repeat the first vertex (zero-length
    edges). The construction of mmcv's ``box_iou_rotated`` kernel, in batched tensor ops.
    """
    pa, pb = rbox_to_poly(a), rbox_to_poly(b)
    slack = tol * torch.maximum(a[..., 2:4].abs().amax(-1), b[..., 2:4].abs().amax(-1)).unsqueeze(-1)
    ca, sa = torch.cos(a[..., 4:5]), torch.sin(a[..., 4:5])
    cb, sb = torch.cos(b[..., 4:5]), torch.sin(b[..., 4:5])
    a_in_b = _inside(pa, b, cb, sb, slack)
    b_in_a = _inside(pb, a, ca, sa, slack)
    d1 = (torch.roll(pa, -1, dims=-2) - pa).unsqueeze(-2)  # a's edge i: corner i → i+1, [..., 4, 1, 2]
    d2 = (torch.roll(pb, -1, dims=-2) - pb).unsqueeze(-3)  # [..., 1, 4, 2]
    r = pb.unsqueeze(-3) - pa.unsqueeze(-2)  # [..., 4, 4, 2]
    den = _cross(d1, d2)
    scale = (d1 * d1).sum(-1).sqrt() * (d2 * d2).sum(-1).sqrt()
    crossing = den.abs() > 1e-12 * scale  # exactly parallel or zero-length edges: no crossing
    safe = torch.where(crossing, den, torch.ones_like(den))
    t = _cross(r, d2) / safe
    hits = (pa.unsqueeze(-2) + t.unsqueeze(-1) * d1).flatten(-3, -2)  # [..., 16, 2]
    crossing = crossing.flatten(-2) & _inside(hits, a, ca, sa, slack) & _inside(hits, b, cb, sb, slack)
    pts = torch.cat([pa, pb, hits], dim=-2)  # [..., 24, 2]
    valid = torch.cat([a_in_b, b_in_a, crossing], dim=-1)  # [..., 24]

    count = valid.sum(-1, keepdim=True)
    w = valid.to(pts.dtype).unsqueeze(-1)
    centre = (pts * w).sum(-2, keepdim=True) / count.clamp_min(1).unsqueeze(-1).to(pts.dtype)
    q = (pts - centre) * w  # invalid slots become the centre, then are replaced below
    angle = torch.atan2(q[..., 1], q[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, 4.0))  # after every real angle (≤ π)
    order = angle.argsort(dim=-1)
    q = q.gather(-2, order.unsqueeze(-1).expand_as(q))
    valid_sorted = valid.gather(-1, order)
    q = torch.where(valid_sorted.unsqueeze(-1), q, q[..., :1, :])
    area = 0.5 * _cross(q, torch.roll(q, -1, dims=-2)).sum(-1)
    return torch.where(count.squeeze(-1) >= 3, area.abs(), torch.zeros_like(area))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10


def rbox_intersection(a: Tensor, b: Tensor) -> Tensor:
    """Intersection area of rotated boxes, broadcast elementwise.

    Args:
        a: ``[..., 5]``.
        b: ``[..., 5]``, broadcastable with ``a``.

    Returns:
        ``[...]`` areas (0 where either box has zero area). Half-precision inputs are computed in float32.
    """
    dtype = torch.promote_types(a.dtype, b.dtype)
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    a, b = torch.broadcast_tensors(a.to(work), b.to(work))
    # Both boxes are expressed around a's centre so the clipping works on small, well-conditioned numbers.
    origin = a[..., :2]
    a0 = torch.cat([torch.zeros_like(a[..., :2]), a[..., 2:]], dim=-1)
    b0 = torch.cat([b[..., :2] - origin, b[..., 2:]], dim=-1)
    inter = _convex_intersection_area(a0, b0, _tolerance(work))
    nonzero = (rbox_area(a) > 0) & (rbox_area(b) > 0)
    return torch.where(nonzero, inter, torch.zeros_like(inter))


def rbox_iou(a: Tensor, b: Tensor, eps: float = 0.0) -> Tensor:
    """Elementwise rotated IoU (broadcast).

    Exact up to floating-point rounding for any pair (identical, nested, touching, disjoint, parallel edges);
    pairs whose union is 0 (both boxes of zero area) have IoU 0. Differentiable almost everywhere with respect to
    both boxes: the vertex selection and angular order are piecewise constant, the area is a polynomial of the
    selected vertices (gradients are those of the clipped polygon; at boundary configurations, one-sided).

    Args:
        a: ``[..., 5]``.
        b: ``[..., 5]``, broadcastable with ``a``.
        eps: added to the union (0 gives the exact ratio; e.g. 1e-6 for a loss).

    Returns:
        ``[...]`` IoU in ``[0, 1]``.
    """
    inter = rbox_intersection(a, b)
    union = rbox_area(a).to(inter.dtype) + rbox_area(b).to(inter.dtype) - inter
    ok = union > 0
    iou = inter / torch.where(ok, union + eps, torch.ones_like(union))
    return torch.where(ok, iou.clamp(0.0, 1.0), torch.zeros_like(iou))


def rbox_iou_pairwise(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise rotated IoU, computed in row chunks to bound memory.

    Args:
        a: ``[..., N, 5]``.
        b: ``[..., M, 5]`` (leading dimensions broadcastable with ``a``'s).

    Returns:
        ``[..., N, M]``.
    """
    n, m = a.shape[-2], b.shape[-2]
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    per_row = max(1, m * max(1, math.prod(lead)))
    rows = max(1, _PAIR_CHUNK // per_row)
    if n <= rows:
        return rbox_iou(a.unsqueeze(-2), b.unsqueeze(-3))
    parts = [rbox_iou(a[..., s : s + rows, :].unsqueeze(-2), b.unsqueeze(-3)) for s in range(0, n, rows)]
    return torch.cat(parts, dim=-2)


def rbox_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Whether the interiors of rotated boxes intersect (positive intersection area), broadcast elementwise.

    Separating-axis test (Gottschalk, Lin & Manocha, "OBBTree", SIGGRAPH 1996, in 2-D): two rectangles are disjoint
    iff their projections on one of the four side normals do not overlap. Much cheaper than the clipping of
    :func:`rbox_intersection`; boxes of zero area never overlap. Touching boxes (projections meeting exactly) do
    not overlap, up to floating-point rounding.

    Args:
        a: ``[..., 5]``.
        b: ``[..., 5]``, broadcastable with ``a``.

    Returns:
        ``[...]`` bool.
    """
    d = b[..., :2] - a[..., :2]
    ua = torch.stack([torch.cos(a[..., 4]), torch.sin(a[..., 4])], dim=-1)
    ub = torch.stack([torch.cos(b[..., 4]), torch.sin(b[..., 4])], dim=-1)
    va = torch.stack([-ua[..., 1], ua[..., 0]], dim=-1)
    vb = torch.stack([-ub[..., 1], ub[..., 0]], dim=-1)
    aw, ah = 0.5 * a[..., 2].abs(), 0.5 * a[..., 3].abs()
    bw, bh = 0.5 * b[..., 2].abs(), 0.5 * b[..., 3].abs()
    overlap = (rbox_area(a) > 0) & (rbox_area(b) > 0)
    for axis in (ua, va, ub, vb):
        ra = aw * (ua * axis).sum(-1).abs() + ah * (va * axis).sum(-1).abs()
        rb = bw * (ub * axis).sum(-1).abs() + bh * (vb * axis).sum(-1).abs()
        overlap = overlap & ((d * axis).sum(-1).abs() < ra + rb)
    return overlap


# ------------------------------------------------------------------------------------------------- NMS
def rotated_nms(rboxes: Tensor, scores: Tensor, iou_threshold: float, labels: Tensor | None = None) -> Tensor:
    """Greedy non-maximum suppression of rotated boxes, class-aware when ``labels`` is given.

    Boxes are visited by descending score, ties by ascending index (a stable sort), and a box is removed when its
    IoU with an already kept box of the same label is **greater than** ``iou_threshold`` (torchvision's ``nms``
    rule). The greedy result is computed without a per-box Python loop: it is the unique fixed point of
    ``keep[j] = not any(keep[i] and S[i, j] for i before j)`` (S = suppression relation), reached by iterating from
    "keep all"; after ``t`` iterations the first ``t`` boxes are final, and in practice a handful of iterations
    suffice. Only pairs that overlap (:func:`rbox_overlap`) and whose labels agree get an IoU computed.

    Args:
        rboxes: ``[N, 5]``.
        scores: ``[N]``.
        iou_threshold: IoU above which the lower-ranked box is suppressed.
        labels: optional ``[N]`` integer classes; boxes of different classes never suppress each other.

    Returns:
        ``[K]`` int64 indices into the inputs of the kept boxes, by descending score (ties: ascending index).
    """
    n = rboxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=rboxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = rboxes[order]
    i, j = torch.triu_indices(n, n, offset=1, device=rboxes.device)
    if labels is not None:
        lab = labels[order]
        same = lab[i] == lab[j]
        i, j = i[same], j[same]
    near = rbox_overlap(boxes[i], boxes[j])
    i, j = i[near], j[near]
    suppress = torch.zeros(n, n, dtype=torch.bool, device=rboxes.device)
    suppress[i, j] = rbox_iou(boxes[i], boxes[j]) > iou_threshold
    keep = torch.ones(n, dtype=torch.bool, device=rboxes.device)
    for _ in range(n):
        new = ~(suppress & keep.unsqueeze(1)).any(dim=0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


# ------------------------------------------------------------------------------------------------- flips, 90° turns
def flip_rboxes(rboxes: Tensor, width: float, height: float, horizontal: bool = True) -> Tensor:
    """Rotated boxes of an image mirrored left-right (``x → W − x``) or top-bottom (``y → H − y``).

    A mirror turns the direction ``(cos θ, sin θ)`` into one at angle ``−θ`` (as an undirected axis), so the box is
    ``(W − cx, cy, w, h, −θ)`` or ``(cx, H − cy, w, h, −θ)``, regularised to le90. Continuous coordinates (module
    docstring) make this exact for the flipped pixel grid: pixel column ``j`` goes to ``W − 1 − j``.

    Args:
        rboxes: ``[..., 5]``.
        width, height: image size in pixels.
        horizontal: left-right mirror if True, else top-bottom.

    Returns:
        ``[..., 5]``.
    """
    cx, cy, w, h, t = rboxes.unbind(-1)
    if horizontal:
        cx = width - cx
    else:
        cy = height - cy
    return regularize_rboxes(torch.stack([cx, cy, w, h, -t], dim=-1))


def rot90_rboxes(rboxes: Tensor, k: int, width: float, height: float) -> Tensor:
    """Rotated boxes of an image turned by ``k`` quarter turns as ``torch.rot90(image, k, dims=(-2, -1))`` does
    (counter-clockwise on screen; the new image is ``H`` wide and ``W`` tall for odd ``k``).

    One turn maps a point ``(x, y)`` of a ``W``-wide image to ``(y, W − x)`` and a direction at angle θ to one at
    ``θ − π/2``; ``k`` turns compose this.

    Args:
        rboxes: ``[..., 5]``.
        k: number of quarter turns (any integer).
        width, height: size of the image before turning.

    Returns:
        ``[..., 5]`` le90 boxes in the turned image.
    """
    out = rboxes
    w_img, h_img = width, height
    for _ in range(k % 4):
        cx, cy, w, h, t = out.unbind(-1)
        out = torch.stack([cy, w_img - cx, w, h, t - HALF_PI], dim=-1)
        w_img, h_img = h_img, w_img
    return regularize_rboxes(out)


def rasterize_rboxes(rboxes: Tensor, height: int, width: int) -> Tensor:
    """Pixels whose centres lie inside each rotated box (strictly inside: boundary-centred pixels are out).

    Args:
        rboxes: ``[..., 5]``.
        height, width: mask size.

    Returns:
        ``[..., height, width]`` bool masks.
    """
    ys = torch.arange(height, device=rboxes.device, dtype=rboxes.dtype) + 0.5
    xs = torch.arange(width, device=rboxes.device, dtype=rboxes.dtype) + 0.5
    cx, cy, w, h, t = (v[..., None, None] for v in rboxes.unbind(-1))
    dx = xs.view(1, -1) - cx
    dy = ys.view(-1, 1) - cy
    cos, sin = torch.cos(t), torch.sin(t)
    lu = dx * cos + dy * sin  # coordinate along the w side
    lv = -dx * sin + dy * cos  # along the h side
    return (lu.abs() < 0.5 * w) & (lv.abs() < 0.5 * h)


__all__ = [
    "flip_rboxes",
    "hbb_to_rbox",
    "min_area_rect",
    "norm_angle_le90",
    "poly_to_rbox",
    "rasterize_rboxes",
    "rbox_area",
    "rbox_intersection",
    "rbox_iou",
    "rbox_iou_pairwise",
    "rbox_overlap",
    "rbox_to_hbb",
    "rbox_to_poly",
    "regularize_rboxes",
    "rot90_rboxes",
    "rotated_nms",
]
