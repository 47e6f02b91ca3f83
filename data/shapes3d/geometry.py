"""Mesh -> the fixed-size inputs of the three M2CP encoders (numpy; shared by both builders).

- points [num_points, 3]: area-weighted uniform samples of the surface;
- MeshNet face features (Feng et al., AAAI 2019, Sec. 3.2): per face its centre [3],
  unit normal [3], the three corner vectors corner - centre [9], and the indices of
  the (up to) three faces sharing an edge with it [3] (itself where an edge is open);
  faces are sampled (more than num_faces) or padded by repetition (fewer), which
  leaves a max-pool over faces unchanged;
- views [num_views, size, size] uint8: Lambert-shaded renders from num_views cameras
  on a ring at 30 degrees elevation (MVCNN's 12-view setup, Su et al., ICCV 2015),
  z-buffered over dense surface samples (a point-splat rasteriser).
"""

from __future__ import annotations

import numpy as np

MESH_FEATURES = ("centers", "normals", "corners", "neighbors")


def face_neighbors(faces: np.ndarray) -> np.ndarray:
  """Edge-adjacent faces: faces [F, 3] int -> [F, 3] int (the face itself where none)."""
  num = len(faces)
  edges = np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], 1)  # [F, 3, 2]
  edges = np.sort(edges, -1).reshape(-1, 2)
  key = edges[:, 0].astype(np.int64) * (faces.max() + 1) + edges[:, 1]
  order = np.argsort(key, kind="stable")
  out = np.repeat(np.arange(num), 3).reshape(num, 3)
  same = key[order[1:]] == key[order[:-1]]  # Consecutive equal keys: a shared edge.
  a, b = order[:-1][same], order[1:][same]
  out.reshape(-1)[a] = b // 3
  out.reshape(-1)[b] = a // 3
  return out


def face_areas_normals(vertices: np.ndarray, faces: np.ndarray):
  """Returns (areas [F], unit normals [F, 3]) of a triangle mesh."""
  tri = vertices[faces]  # [F, 3 corners, 3 xyz]
  cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  norm = np.linalg.norm(cross, axis=-1)
  return 0.5 * norm, cross / np.maximum(norm, 1e-12)[:, None]


def sample_surface(vertices, faces, num: int, rng: np.random.Generator):
  """Area-weighted uniform surface samples: returns (points [num, 3], normals [num, 3])."""
  areas, normals = face_areas_normals(vertices, faces)
  idx = rng.choice(len(faces), size=num, p=areas / areas.sum())
  u, v = rng.random((2, num))
  flip = u + v > 1  # Fold the unit square onto the triangle.
  u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
  tri = vertices[faces[idx]]
  pts = tri[:, 0] + u[:, None] * (tri[:, 1] - tri[:, 0]) + v[:, None] * (tri[:, 2] - tri[:, 0])
  return pts.astype(np.float32), normals[idx].astype(np.float32)


def mesh_face_features(vertices, faces, num_faces: int, rng: np.random.Generator
                       ) -> dict[str, np.ndarray]:
  """MeshNet inputs with exactly num_faces faces (sampled or padded by repetition)."""
  nbr = face_neighbors(faces)
  num = len(faces)
  if num > num_faces:  # Keep a random subset; neighbours that were dropped -> self.
    keep = np.sort(rng.choice(num, num_faces, replace=False))
    new_index = np.full(num, -1)
    new_index[keep] = np.arange(num_faces)
    nbr = new_index[nbr[keep]]
    nbr = np.where(nbr < 0, np.arange(num_faces)[:, None], nbr)
    faces = faces[keep]
  elif num < num_faces:  # Repeat faces cyclically: neighbour indices stay valid.
    rep = np.arange(num_faces) % num
    faces, nbr = faces[rep], nbr[rep]
  tri = vertices[faces]  # [num_faces, 3, 3]
  centers = tri.mean(1)
  _, normals = face_areas_normals(vertices, faces)
  corners = (tri - centers[:, None]).reshape(-1, 9)
  return {"centers": centers.astype(np.float32), "normals": normals.astype(np.float32),
          "corners": corners.astype(np.float32), "neighbors": nbr.astype(np.int32)}


def view_directions(num_views: int, elevation_deg: float = 30.0) -> np.ndarray:
  """Unit vectors from the object to num_views cameras on a ring: [num_views, 3] (z is up)."""
  az = 2 * np.pi * np.arange(num_views) / num_views
  el = np.deg2rad(elevation_deg)
  return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az),
                   np.full_like(az, np.sin(el))], -1)


def render_views(points, normals, num_views: int, size: int) -> np.ndarray:
  """Shaded orthographic z-buffer renders of oriented surface samples: uint8 [V, size, size]."""
  up = np.array([0.0, 0.0, 1.0])
  images = np.zeros((num_views, size, size), np.uint8)
  for v, d in enumerate(view_directions(num_views)):
    right = np.cross(up, d)
    right /= np.linalg.norm(right)
    cam_up = np.cross(d, right)
    x, y, depth = points @ right, points @ cam_up, points @ d  # depth: larger = nearer.
    col = np.clip(((x + 1) * 0.5 * size).astype(int), 0, size - 1)
    row = np.clip(((1 - y) * 0.5 * size).astype(int), 0, size - 1)
    pix = row * size + col
    order = np.lexsort((-depth, pix))  # Per pixel, nearest first.
    first = order[np.r_[True, pix[order][1:] != pix[order][:-1]]]
    # Headlight Lambert shading (two-sided) plus a depth cue.
    shade = 0.25 + 0.55 * np.abs(normals[first] @ d) + 0.2 * (depth[first] + 1) / 2
    images[v].reshape(-1)[pix[first]] = np.clip(shade * 255, 1, 255).astype(np.uint8)
  return images


def check_example(name: str, points: np.ndarray, neighbors: np.ndarray, *,
                  min_points: int) -> None:
  """Raises ValueError naming the sample on NaN / too few points or out-of-range neighbours."""
  if points.ndim != 2 or points.shape[-1] != 3 or len(points) < min_points:
    raise ValueError(f"sample {name!r}: point cloud of shape {points.shape} is not accepted: "
                     f"expected [N >= {min_points}, 3]")
  if not np.isfinite(points).all():
    raise ValueError(f"sample {name!r}: point cloud has {int((~np.isfinite(points)).sum())} "
                     "non-finite coordinates; expected finite values")
  bad = (neighbors < 0) | (neighbors >= len(neighbors))
  if bad.any():
    raise ValueError(f"sample {name!r}: face neighbour index {int(neighbors[bad][0])} is out "
                     f"of range; expected indices in [0, {len(neighbors)})")
