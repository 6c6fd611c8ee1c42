"""Trajectory meshes (``polish3d.io.ply``): RELION's legacy geometry, readable by plyfile."""

import numpy as np
import plyfile

from polish3d.io import ply


def _example(n=3, f=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 500, (n, 3))
    traj = rng.normal(0, 2.0, (n, f, 3))
    order = rng.permutation(f)
    traj[:, order[0]] = 0.0
    return x, traj, order


def test_mesh_geometry():
    x, traj, order = _example()
    v, col, faces = ply.trajectory_mesh(x, traj, order, scale=8.0)
    n, f = traj.shape[:2]
    assert v.shape == (n * (f - 1) * 14, 3) and faces.shape == (n * (f - 1) * 14, 3)
    bars = v.reshape(n, f - 1, 7, 2, 3)
    pts = x[:, None] + 8.0 * traj[:, order]  # by dose rank
    # ring centres at the segment ends, radius 0.1 px, rings perpendicular to the segment
    assert np.allclose(bars[..., 0, :].mean(2), pts[:, :-1])
    assert np.allclose(bars[..., 1, :].mean(2), pts[:, 1:])
    rad = np.linalg.norm(bars[..., 0, :] - pts[:, :-1, None], axis=-1)
    assert np.allclose(rad, 0.1)
    d = pts[:, 1:] - pts[:, :-1]
    assert np.allclose(np.einsum("nsrd,nsd->nsr", bars[..., 0, :] - pts[:, :-1, None], d), 0, atol=1e-9)
    # grey levels: 255 for the first segment, then 168 / 84 alternating
    grey = col[:, 0].reshape(n, f - 1, 14)
    assert np.all(grey[:, 0] == 255) and np.all(grey[:, 1] == 84) and np.all(grey[:, 2] == 168)
    assert faces.min() == 0 and faces.max() == len(v) - 1


def test_zero_motion_has_no_nans():
    x = np.array([[10.0, 20.0, 30.0]])
    v, _, _ = ply.trajectory_mesh(x, np.zeros((1, 4, 3)), np.arange(4))
    assert np.all(np.isfinite(v))
    assert np.allclose(np.linalg.norm(v - x, axis=1), 0.1)


def test_write_and_read_back(tmp_path):
    x, traj, order = _example(n=4, f=6)
    paths = ply.write_trajectory_meshes(tmp_path / "Trajectories", "TS_01", x, traj, order)
    assert [p.name for p in paths] == ["TS_01_x1.ply", "TS_01_x8.ply"]
    assert not list((tmp_path / "Trajectories").glob("*.tmp"))
    for p, s in zip(paths, (1.0, 8.0)):
        data = plyfile.PlyData.read(str(p))
        assert data.text
        vert = data["vertex"]
        face = data["face"]
        assert vert.count == 4 * 5 * 14 and face.count == 4 * 5 * 14
        xyz = np.stack([vert["x"], vert["y"], vert["z"]], 1)
        v, col, faces = ply.trajectory_mesh(x, traj, order, scale=s)
        assert np.allclose(xyz, v, atol=1e-3)
        assert np.array_equal(vert["red"], col[:, 0]) and vert["red"].dtype == np.uint8
        assert np.array_equal(np.stack(face["vertex_index"]), faces)
    header = paths[0].read_text().split("end_header")[0]
    assert "property float32 x" in header and "property list uint8 int32 vertex_index" in header


def test_plot(tmp_path):
    x, traj, order = _example(n=5, f=6)
    p = ply.plot_trajectories(x, traj, order, tmp_path / "plots" / "TS_01_motion.png", title="TS_01")
    assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "plots").glob("*.tmp*"))
