"""Camera, road geometry and renderer of the procedural driving world (vwm.data.toyworld).

A level pinhole camera looks at a flat ground plane. Ground pixels are shaded by inverse perspective mapping
in road (Frenet) coordinates: (s, d) is computed exactly at a few knots per image row and interpolated along
the row. Lane markings, region edges and textures are box-filtered analytically against each pixel's ground
footprint, so frames are anti-aliased at any resolution without supersampling. Objects (vehicles, posts,
trees) are boxes and billboards drawn far to near with coverage-weighted edges. See docs/toyworld.md.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from vwm.actions import GOAL_IMAGE_SIZE

NEAR_M = 0.5
"""Objects with a corner closer than this to the camera plane are not drawn."""
FAR_M = 250.0
"""Objects farther than this are not drawn (they are lost in the haze)."""
VERGE_M = 1.6
"""Width of the gravel verge beyond each road edge."""
EDGE_LINE = (0.3, 0.15)
"""Solid edge line: distance inside the road edge and width, metres."""
LANE_LINE_WIDTH_M = 0.12
DASH_LENGTH_M, DASH_PERIOD_M = 3.0, 9.0
TEXTURE_CELL_M = 0.25
"""Ground size of one cell of the noise table."""


@dataclass(frozen=True)
class Camera:
    """Level pinhole camera on the ego; intrinsics are those of a virtual 1600x900 CAM_FRONT image.

    Ego frame: origin on the ground below the rear axle, x forward, y left, z up (metres). The principal point
    sits above the image centre (the horizon is at 40 % of the height), a shifted sensor rather than a pitch,
    so vertical edges stay vertical."""

    focal: float = 1266.4
    cx: float = 800.0
    cy: float = 360.0
    height: float = 1.5
    forward: float = 1.7

    def scaled(self, height: int, width: int) -> tuple[float, float, float]:
        """(focal, cx, cy) in pixels of a `height`x`width` frame: the virtual image centre-cropped to that
        aspect ratio and resized, as the nuScenes reader does with a 1600x900 frame."""
        full_w, full_h = GOAL_IMAGE_SIZE
        scale = max(width / full_w, height / full_h)
        off_u, off_v = (full_w - width / scale) / 2, (full_h - height / scale) / 2
        return self.focal * scale, (self.cx - off_u) * scale, (self.cy - off_v) * scale

    def project(self, x: np.ndarray, y: np.ndarray, z: np.ndarray | float = 0.0):
        """Ego-frame points to virtual-image pixels: (u, v, depth), depth along the optical axis."""
        depth = np.asarray(x, dtype=np.float64) - self.forward
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.cx - self.focal * np.asarray(y) / depth
            v = self.cy - self.focal * (np.asarray(z) - self.height) / depth
        return u, v, depth


@dataclass
class Road:
    """Road centreline sampled every `step` metres of arc length from `s0`, with its lanes."""

    s0: float
    step: float
    x: np.ndarray
    y: np.ndarray
    heading: np.ndarray
    curvature: np.ndarray
    num_lanes: int
    lane_width: float

    @property
    def half_width(self) -> float:
        """Distance from the centreline to the road edge."""
        return self.num_lanes * self.lane_width / 2

    def lane_centre(self, lane: int) -> float:
        """Lateral offset d (left positive) of lane `lane`, counted from the rightmost lane 0."""
        return -self.half_width + (lane + 0.5) * self.lane_width

    def frame(self, s: np.ndarray):
        """Centreline position and heading at arc lengths `s` (linear interpolation)."""
        pos = np.clip((np.asarray(s, dtype=np.float64) - self.s0) / self.step, 0, len(self.x) - 1.000001)
        i = pos.astype(np.int64)
        f = pos - i
        hx = self.x[i] + f * (self.x[i + 1] - self.x[i])
        hy = self.y[i] + f * (self.y[i + 1] - self.y[i])
        return hx, hy, self.heading[i] + f * (self.heading[i + 1] - self.heading[i])

    def point(self, s: np.ndarray, d: np.ndarray):
        """World (x, y) of road coordinates (s along the centreline, d to its left)."""
        cx, cy, h = self.frame(s)
        return cx - d * np.sin(h), cy + d * np.cos(h)

    def project(self, px: np.ndarray, py: np.ndarray, s_lo: float, s_hi: float):
        """Road coordinates (s, d) of world points: nearest centreline point with s in [s_lo, s_hi]."""
        n = len(self.x)
        i_lo = int(np.clip((s_lo - self.s0) / self.step, 0, n - 1))
        i_hi = int(np.clip((s_hi - self.s0) / self.step, i_lo + 1, n))
        cand = np.arange(i_lo, i_hi, 24)  # every 12 m, then Newton steps on the distance
        dist = (px[..., None] - self.x[cand]) ** 2 + (py[..., None] - self.y[cand]) ** 2
        s = self.s0 + self.step * cand[np.argmin(dist, axis=-1)]
        for _ in range(4):
            cx, cy, h = self.frame(s)
            cos, sin = np.cos(h), np.sin(h)
            ex, ey = px - cx, py - cy
            kappa = self.curvature[np.clip(np.rint((s - self.s0) / self.step).astype(np.int64), 0, n - 1)]
            s = s + (ex * cos + ey * sin) / np.maximum(1 - kappa * (ey * cos - ex * sin), 0.25)
        cx, cy, h = self.frame(s)
        return s, (py - cy) * np.cos(h) - (px - cx) * np.sin(h)


@dataclass
class Scene:
    """Everything the renderer draws: road, static billboards, moving vehicles and colours (RGB in [0,1])."""

    road: Road
    prop_xy: np.ndarray
    """(N, 2) world position of each billboard (posts, tree trunks and crowns)."""
    prop_box: np.ndarray
    """(N, 3) width, bottom and top height in metres."""
    prop_colour: np.ndarray
    prop_round: np.ndarray
    """(N,) bool: ellipse (tree crown) instead of rectangle."""
    vehicle_s: np.ndarray
    """(M,) arc length of each vehicle centre at time 0; vehicles drive along their lane at constant speed."""
    vehicle_d: np.ndarray
    vehicle_speed: np.ndarray
    vehicle_size: np.ndarray
    """(M, 2) length and width."""
    vehicle_colour: np.ndarray
    sky: np.ndarray
    haze: np.ndarray
    grass: np.ndarray
    verge: np.ndarray
    asphalt: np.ndarray
    paint: np.ndarray
    hills: list[tuple[np.ndarray, np.ndarray]]
    """(tan of the silhouette elevation over azimuth 0..2pi, colour), far layer first."""
    noise: np.ndarray
    """Periodic noise table (power-of-two square), zero mean, about unit range."""
    texture: float
    fog_m: float


@dataclass(frozen=True)
class _Geometry:
    focal: float
    cx: float
    cy: float
    height: int
    width: int
    row0: int
    depth: np.ndarray
    xn: np.ndarray
    knot_xn: np.ndarray
    knot_px: float
    knot_idx: np.ndarray
    knot_frac: np.ndarray
    sky_tan: np.ndarray
    sec: np.ndarray
    azimuth: np.ndarray


@functools.lru_cache(maxsize=16)
def _geometry(camera: Camera, height: int, width: int) -> _Geometry:
    f, cx, cy = camera.scaled(height, width)
    rows = np.arange(height) + 0.5
    row0 = int(np.searchsorted(rows, cy + 1e-6, side="right"))
    depth = np.minimum(camera.height * f / (rows[row0:] - cy), 5000.0)
    xn = (np.arange(width) + 0.5 - cx) / f
    knots = min(17, max(5, width // 8 + 1))
    knot_px = (width - 1) / (knots - 1)
    col = np.arange(width) / knot_px
    knot_idx = np.minimum(col.astype(np.int64), knots - 2)
    return _Geometry(
        focal=f, cx=cx, cy=cy, height=height, width=width, row0=row0, depth=depth,
        xn=xn.astype(np.float32), knot_xn=(np.arange(knots) * knot_px + 0.5 - cx) / f, knot_px=knot_px,
        knot_idx=knot_idx, knot_frac=(col - knot_idx).astype(np.float32),
        sky_tan=((cy - rows[:row0]) / f).astype(np.float32),
        sec=np.sqrt(1 + xn**2).astype(np.float32), azimuth=np.arctan(-xn).astype(np.float32),
    )


def render(scene: Scene, poses: np.ndarray, times: np.ndarray, camera: Camera, height: int,
           width: int) -> np.ndarray:
    """uint8 (T, 3, H, W) frames of `scene` seen from ego poses (T, 3: world x, y, yaw) at `times` seconds."""
    geo = _geometry(camera, height, width)
    out = np.empty((len(poses), 3, height, width), dtype=np.uint8)
    s_ego, _ = scene.road.project(poses[:, 0], poses[:, 1], scene.road.s0, scene.road.s0 + 1e9)
    chunk = max(1, (1 << 17) // (height * width))  # frames shaded together: small frames are batched
    for start in range(0, len(poses), chunk):
        span = slice(start, start + chunk)
        img = np.empty((len(poses[span]), 3, height, width), dtype=np.float32)
        _shade_sky(img, geo, scene, poses[span, 2])
        _shade_ground(img, geo, scene, camera, poses[span], s_ego[span])
        for k, pose in enumerate(poses[span]):
            _draw_objects(img[k], geo, scene, camera, pose, float(times[start + k]))
        np.clip(img * 255.0 + 0.5, 0, 255, out=img)
        out[span] = img
    return out


def _shade_sky(img: np.ndarray, geo: _Geometry, scene: Scene, yaw: np.ndarray) -> None:
    r0 = geo.row0
    t = np.clip(geo.sky_tan / 0.45, 0, 1) ** 0.7
    gradient = scene.haze[:, None] + t[None, :] * (scene.sky - scene.haze)[:, None]
    img[:, :, :r0, :] = gradient[None, :, :, None]
    sky = img[:, :, :r0, :]
    rows = np.arange(r0, dtype=np.float32)[None, None, :, None]
    for table, colour in scene.hills:
        turns = (yaw[:, None] + geo.azimuth[None, :]) * (len(table) / (2 * math.pi))
        top = geo.cy - geo.focal * table[np.floor(turns).astype(np.int64) % len(table)] * geo.sec
        cover = np.clip(rows + 1.0 - top[:, None, None, :], 0, 1)
        sky += cover * (colour[None, :, None, None] - sky)


def _line(a: np.ndarray, centre: float, width: float, fp: np.ndarray) -> np.ndarray:
    """Coverage of a pixel with footprint `fp` at lateral position `a` by a stripe of `width` at `centre`."""
    cover = np.maximum((0.5 * (fp + width) - np.abs(a - centre)) / fp, 0)
    return np.minimum(cover, np.minimum(width / fp, 1))


def _dashes(s: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Coverage of the dash pattern along the road, fading to its mean where the footprint spans a period."""
    m = np.mod(s - DASH_LENGTH_M / 2, DASH_PERIOD_M)
    dist = DASH_PERIOD_M / 2 - np.abs(m - DASH_PERIOD_M / 2)
    single = _line(dist, 0.0, DASH_LENGTH_M, fp)
    fade = np.minimum(fp / DASH_PERIOD_M, 1)
    return single + fade * (DASH_LENGTH_M / DASH_PERIOD_M - single)


def _bilinear(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Periodic bilinear lookup of a power-of-two square table at cell coordinates (u, v)."""
    n = table.shape[0]
    flat = table.ravel()
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    iu, iv = iu.astype(np.int64) & (n - 1), iv.astype(np.int64) & (n - 1)
    iu1, r0 = (iu + 1) & (n - 1), iv * n
    r1 = ((iv + 1) & (n - 1)) * n
    a, b = flat[r0 + iu], flat[r0 + iu1]
    top = a + fu * (b - a)
    c, d = flat[r1 + iu], flat[r1 + iu1]
    bottom = c + fu * (d - c)
    return top + fv * (bottom - top)


def _shade_ground(img: np.ndarray, geo: _Geometry, scene: Scene, camera: Camera, poses: np.ndarray,
                  s_ego: np.ndarray) -> None:
    road = scene.road
    ex, ey = poses[:, 0, None, None], poses[:, 1, None, None]
    cos, sin = np.cos(poses[:, 2])[:, None, None], np.sin(poses[:, 2])[:, None, None]
    depth = geo.depth[None, :, None]
    fwd = depth + camera.forward
    lat = -geo.knot_xn[None, None, :] * depth
    kx = ex + fwd * cos - lat * sin
    ky = ey + fwd * sin + lat * cos
    sk, dk = road.project(kx, ky, float(s_ego.min()) - 60.0, float(s_ego.max()) + FAR_M + 80.0)

    # Per knot interval: value at its start, slope, and the pixel footprint along s and d (column + row
    # derivatives). An interval whose s jumps spans two branches of the road (far from it): drawn as grass.
    s_sl, d_sl = np.diff(sk, axis=2), np.diff(dk, axis=2)
    torn = np.abs(s_sl) > 2.0 * depth * (geo.knot_xn[1] - geo.knot_xn[0]) + 4.0
    d_a = np.where(torn, 1e4, dk[:, :, :-1])
    d_sl = np.where(torn, 0.0, d_sl)
    row_s, row_d = np.abs(np.gradient(sk, axis=1)), np.abs(np.gradient(dk, axis=1))
    fp_s = np.abs(s_sl) / geo.knot_px + 0.5 * (row_s[:, :, :-1] + row_s[:, :, 1:])
    fp_d = np.abs(d_sl) / geo.knot_px + 0.5 * (row_d[:, :, :-1] + row_d[:, :, 1:])
    j, fr = geo.knot_idx, geo.knot_frac
    f32 = np.float32
    s = sk[:, :, :-1].astype(f32)[:, :, j] + fr * s_sl.astype(f32)[:, :, j]
    a = np.abs(d_a.astype(f32)[:, :, j] + fr * d_sl.astype(f32)[:, :, j])
    fp_d = np.maximum(fp_d.astype(f32), 1e-3)[:, :, j]
    fp_s = np.maximum(fp_s.astype(f32), 1e-3)[:, :, j]

    hw = road.half_width
    verge = np.clip((hw + VERGE_M - a) / fp_d + 0.5, 0, 1)
    asphalt = np.clip((hw - a) / fp_d + 0.5, 0, 1)
    paint = _line(a, hw - EDGE_LINE[0], EDGE_LINE[1], fp_d)
    dash = _dashes(s, fp_s)
    for offset in sorted({abs(road.lane_centre(k) + road.lane_width / 2) for k in range(road.num_lanes - 1)}):
        paint = np.maximum(paint, _line(a, offset, LANE_LINE_WIDTH_M, fp_d) * dash)

    # World-anchored texture, faded out where a row's depth footprint exceeds the texture cell.
    xn = geo.xn[None, None, :]
    wx = (ex + fwd * cos).astype(f32) + (depth * sin).astype(f32) * xn
    wy = (ey + fwd * sin).astype(f32) - (depth * cos).astype(f32) * xn
    amp = np.clip(2.0 * TEXTURE_CELL_M * camera.height * geo.focal / depth**2, 0, 1).astype(f32)
    tex = _bilinear(scene.noise, wx / TEXTURE_CELL_M, wy / TEXTURE_CELL_M) * (scene.texture * amp)
    shade = 1.0 + tex * (0.35 - 0.22 * asphalt)
    fog = (1.0 - np.exp(-depth / scene.fog_m)).astype(f32)
    for ch in range(3):
        g, v, r = scene.grass[ch], scene.verge[ch], scene.asphalt[ch]
        col = (g + verge * (v - g) + asphalt * (r - v)) * shade
        col += paint * (scene.paint[ch] - col)
        img[:, ch, geo.row0:] = col + fog * (scene.haze[ch] - col)


def to_ego_frame(pose: np.ndarray, x: np.ndarray, y: np.ndarray):
    """World points (x, y) in the ego frame (x forward, y left) of ego pose (x, y, yaw)."""
    cos, sin = math.cos(pose[2]), math.sin(pose[2])
    dx, dy = x - pose[0], y - pose[1]
    return dx * cos + dy * sin, dy * cos - dx * sin


def _draw_objects(img: np.ndarray, geo: _Geometry, scene: Scene, camera: Camera, pose: np.ndarray,
                  time: float) -> None:
    f, cx, cy, h = geo.focal, geo.cx, geo.cy, camera.height
    items: list[tuple[float, int, tuple]] = []
    ox, oy = to_ego_frame(pose, scene.prop_xy[:, 0], scene.prop_xy[:, 1])
    depth = ox - camera.forward
    with np.errstate(divide="ignore", invalid="ignore"):
        u, half = cx - f * oy / depth, 0.5 * f * scene.prop_box[:, 0] / depth
        v_bot = cy + f * (h - scene.prop_box[:, 1]) / depth
        v_top = cy + f * (h - scene.prop_box[:, 2]) / depth
        alpha = np.clip((2 * half * (v_bot - v_top) - 0.1) / 0.2, 0, 1)  # fade out props below 0.3 px^2
    visible = (depth > NEAR_M) & (depth < FAR_M) & (u + half > 0) & (u - half < geo.width) & (alpha > 0)
    for i in np.flatnonzero(visible):
        box = (u[i] - half[i], u[i] + half[i], v_top[i], v_bot[i])
        prop = ("prop", box, scene.prop_colour[i], bool(scene.prop_round[i]), alpha[i])
        items.append((float(depth[i]), len(items), prop))

    vs = scene.vehicle_s + scene.vehicle_speed * time
    vx, vy = scene.road.point(vs, scene.vehicle_d)
    _, _, heading = scene.road.frame(vs)
    for i in range(len(vs)):
        rel = heading[i] - pose[2]
        cx_e, cy_e = to_ego_frame(pose, vx[i], vy[i])
        length, width = scene.vehicle_size[i]
        corners = _rect(cx_e, cy_e, rel, -length / 2, length / 2, width / 2)
        if corners[:, 0].min() - camera.forward > NEAR_M and cx_e - camera.forward < FAR_M:
            cabin = _rect(cx_e, cy_e, rel, -0.32 * length, 0.18 * length, 0.43 * width)
            vehicle = ("vehicle", corners, cabin, scene.vehicle_colour[i])
            items.append((float(cx_e - camera.forward), len(items), vehicle))

    for dist, _, item in sorted(items, key=lambda it: (-it[0], it[1])):
        fog = 1.0 - math.exp(-dist / scene.fog_m)
        if item[0] == "prop":
            _, box, colour, rounded, alpha = item
            _fill_billboard(img, box, colour + fog * (scene.haze - colour), rounded, alpha)
        else:
            _, corners, cabin, colour = item
            _draw_vehicle(img, geo, camera, corners, cabin, colour, scene.haze, fog)


def _rect(x: float, y: float, heading: float, back: float, front: float, half_width: float) -> np.ndarray:
    """(4, 2) ground corners (front-left, front-right, rear-right, rear-left) of a box in the ego frame."""
    local = np.array([[front, half_width], [front, -half_width], [back, -half_width], [back, half_width]])
    cos, sin = math.cos(heading), math.sin(heading)
    return np.stack([x + local[:, 0] * cos - local[:, 1] * sin, y + local[:, 0] * sin + local[:, 1] * cos], 1)


_BODY_Z, _CABIN_Z = (0.3, 1.1), (1.1, 1.55)
_GLASS = np.array([0.12, 0.14, 0.17], dtype=np.float32)


def _draw_vehicle(img: np.ndarray, geo: _Geometry, camera: Camera, corners: np.ndarray, cabin: np.ndarray,
                  colour: np.ndarray, haze: np.ndarray, fog: float) -> None:
    """Shadow, then the camera-facing faces of the body and cabin boxes (back-face culled)."""
    centre = corners.mean(axis=0)
    xy = np.concatenate([centre + 1.1 * (corners - centre), corners, corners, cabin, cabin])
    z = np.repeat([0.0, *_BODY_Z, *_CABIN_Z], 4)
    depth = xy[:, 0] - camera.forward
    u, v = geo.cx - geo.focal * xy[:, 1] / depth, geo.cy - geo.focal * (z - camera.height) / depth
    px = np.stack([u, v], 1).tolist()
    _fill_quad(img, px[:4], np.zeros(3, np.float32), 0.55 * (1 - fog))
    for box, (rect, top_z, base) in enumerate(((corners, _BODY_Z[1], colour), (cabin, _CABIN_Z[1], _GLASS))):
        low, high = px[4 + 8 * box: 8 + 8 * box], px[8 + 8 * box: 12 + 8 * box]
        mx, my = rect.mean(axis=0)
        for k in range(4):
            n = (k + 1) % 4
            fx, fy = 0.5 * (rect[k, 0] + rect[n, 0]), 0.5 * (rect[k, 1] + rect[n, 1])
            if (fx - mx) * (camera.forward - fx) - (fy - my) * fy > 0:
                col = base * (0.92 if k % 2 == 0 else 0.72)
                _fill_quad(img, [low[k], low[n], high[n], high[k]], col + fog * (haze - col), 1.0)
        if camera.height > top_z:
            col = base * 1.08
            _fill_quad(img, high, col + fog * (haze - col), 1.0)


def _fill_quad(img: np.ndarray, pts: list[list[float]], colour: np.ndarray, alpha: float) -> None:
    """Blend a convex quadrilateral (4 pixel points) into `img`, coverage from its edge distances."""
    us, vs = [p[0] for p in pts], [p[1] for p in pts]
    u0, v0 = max(math.floor(min(us)), 0), max(math.floor(min(vs)), 0)
    u1, v1 = min(math.ceil(max(us)), img.shape[2]), min(math.ceil(max(vs)), img.shape[1])
    area2 = sum(us[i] * vs[i - 3] - us[i - 3] * vs[i] for i in range(4))
    if u1 <= u0 or v1 <= v0 or area2 == 0:
        return
    orient, lines = math.copysign(1.0, area2), []
    for i in range(4):  # signed distance to each edge line, positive inside: a*u + b*v + c
        (x0, y0), (x1, y1) = pts[i], pts[i - 3]
        length = math.hypot(x1 - x0, y1 - y0)
        if length > 1e-9:
            a, b = -orient * (y1 - y0) / length, orient * (x1 - x0) / length
            lines.append((a, b, -(a * x0 + b * y0)))
    abc = np.array(lines, dtype=np.float32)[:, :, None, None]
    uu, vv = _PIXEL_CENTRES[None, None, u0:u1], _PIXEL_CENTRES[None, v0:v1, None]
    inside = (abc[:, 0] * uu + abc[:, 1] * vv + abc[:, 2]).min(axis=0)
    cover = np.minimum(np.maximum(inside + 0.5, 0), 1) * alpha
    region = img[:, v0:v1, u0:u1]
    region += cover * (colour[:, None, None] - region)


_PIXEL_CENTRES = np.arange(8192, dtype=np.float32) + 0.5


def _fill_billboard(img: np.ndarray, box: tuple[float, float, float, float], colour: np.ndarray,
                    rounded: bool, alpha: float) -> None:
    """Blend an upright rectangle or ellipse (pixel box u0, u1, v0, v1) with exact 1-D box coverage."""
    bu0, bu1, bv0, bv1 = box
    u0, v0 = max(math.floor(bu0), 0), max(math.floor(bv0), 0)
    u1, v1 = min(math.ceil(bu1), img.shape[2]), min(math.ceil(bv1), img.shape[1])
    if u1 <= u0 or v1 <= v0:
        return
    uu, vv = _PIXEL_CENTRES[u0:u1], _PIXEL_CENTRES[v0:v1]
    if rounded:
        ru, rv = 0.5 * (bu1 - bu0), 0.5 * (bv1 - bv0)
        du = ((uu - 0.5 * (bu0 + bu1)) / ru)[None, :]
        dv = ((vv - 0.5 * (bv0 + bv1)) / rv)[:, None]
        cover = np.minimum(np.maximum((1 - np.sqrt(du * du + dv * dv)) * min(ru, rv) + 0.5, 0), 1) * alpha
    else:  # inside the clipped box both 1-D overlaps lie in (0, 1]
        cu = np.minimum(uu + 0.5, bu1) - np.maximum(uu - 0.5, bu0)
        cv = np.minimum(vv + 0.5, bv1) - np.maximum(vv - 0.5, bv0)
        cover = cv[:, None] * (alpha * cu[None, :])
    region = img[:, v0:v1, u0:u1]
    region += cover * (colour[:, None, None] - region)
