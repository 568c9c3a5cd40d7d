import pytest
import yaml

from planner.cluster import cluster_to_yaml, load_cluster
from planner.errors import SpecError
from planner.presets import cluster_preset_names, resolve_cluster


@pytest.mark.parametrize("name", [n for n in cluster_preset_names() if n != "local"])
def test_presets_load_and_round_trip(name, tmp_path):
    cluster = resolve_cluster(name)
    path = tmp_path / "c.yaml"
    path.write_text(cluster_to_yaml(cluster))
    assert load_cluster(path) == cluster


def test_required_presets_exist():
    for name in (
        "dgx-a100-8x80g",
        "dgx-h100-8",
        "a100-cluster-128",
        "rtx4090-nvme",
        "hetero-a100-32",
        "local",
    ):
        assert name in cluster_preset_names()
    assert resolve_cluster("a100-cluster-128").world_size == 128


def test_links_are_heterogeneous():
    c = resolve_cluster("hetero-a100-32")
    bw = c.bandwidth_matrix()
    assert bw[0, 1] == 300e9  # NVLink inside a node
    assert bw[0, 8] == 25e9  # n0-n1: same rack
    assert bw[0, 16] == 6.25e9  # n0-n2: across the oversubscribed uplink
    assert bw[16, 29] == bw[29, 16] == 3e9  # one degraded pair, n2:d0 - n3:d5
    assert bw[17, 29] == 25e9  # n2-n3 otherwise at peak
    assert c.link(16, 29).bandwidth == 3e9
    assert c.link(1, 20).bandwidth == 6.25e9


def test_resize_keeps_fabric_and_drops_overrides_beyond():
    c = resolve_cluster("hetero-a100-32", nodes=2)
    assert c.world_size == 16 and c.links.overrides == ()
    big = resolve_cluster("dgx-a100-8x80g", nodes=64)
    assert big.world_size == 512 and big.links.inter_node.bandwidth == 25e9


def _write(tmp_path, data):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base():
    return yaml.safe_load(cluster_to_yaml(resolve_cluster("rtx4090-nvme")))


def test_unknown_key_is_named(tmp_path):
    data = _base()
    data["device"]["memroy"] = "24GiB"
    with pytest.raises(SpecError, match=r"device\.memroy: unknown key \(did you mean 'memory'\?\)"):
        load_cluster(_write(tmp_path, data))


def test_non_positive_size_is_named(tmp_path):
    data = _base()
    data["host"][1]["capacity"] = 0
    with pytest.raises(SpecError, match=r"host\[1\]\.capacity: must be positive"):
        load_cluster(_write(tmp_path, data))


def test_bad_unit_is_named(tmp_path):
    data = _base()
    data["links"]["intra_node"]["bandwidth"] = "fast"
    with pytest.raises(SpecError, match=r"links\.intra_node\.bandwidth: expected bandwidth"):
        load_cluster(_write(tmp_path, data))


def test_override_beyond_cluster(tmp_path):
    data = _base()
    data["links"]["overrides"] = [{"between": ["n0", "n4"], "bandwidth": "1GB/s"}]
    with pytest.raises(SpecError, match=r"node n4 >= nodes\(1\)"):
        load_cluster(_write(tmp_path, data))


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nnodes: 1\ndevice: {kind: a\n  memory: 3\n")
    with pytest.raises(SpecError) as e:
        load_cluster(path)
    assert str(path) in str(e.value) and e.value.line is not None and "malformed YAML" in str(e.value)


def test_unknown_preset_lists_closest():
    with pytest.raises(SpecError, match="closest: dgx-a100-8x80g"):
        resolve_cluster("dgx-a100")
