"""Multi-host start-up with the environment of TPU pods simulated (no network, `jax.distributed.initialize` faked)."""

import logging

import pytest

from skyjax.parallel.distributed import (ClusterSpec, DistributedConfigError, LeadHostFilter, detect_cluster,
                                         host_shard, initialize_from_environment, is_lead_host, lead_only_print)

HOSTS = "t1v-n-abc-w-0,t1v-n-abc-w-1,t1v-n-abc-w-2,t1v-n-abc-w-3"


class FakeInitialize:
    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)


def four_host_slice(worker_id):
    return {"TPU_WORKER_HOSTNAMES": HOSTS, "TPU_WORKER_ID": str(worker_id), "TPU_ACCELERATOR_TYPE": "v5litepod-16"}


def test_four_host_slice_joins_with_worker_0_as_coordinator():
    seen = []
    for worker in range(4):
        init = FakeInitialize()
        spec = initialize_from_environment(four_host_slice(worker), initialize=init, tpu_chips=True)
        assert init.calls == [{"coordinator_address": "t1v-n-abc-w-0:8482", "num_processes": 4,
                               "process_id": worker}]
        assert spec.source == "tpu-env" and spec.workers == tuple(HOSTS.split(","))
        seen.append((spec.process_id, spec.is_lead))
    assert seen == [(0, True), (1, False), (2, False), (3, False)]


def test_two_slices_number_processes_slice_major():
    specs = []
    for slice_id in range(2):
        for worker in range(4):
            env = {**four_host_slice(worker), "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": str(slice_id),
                   "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}
            init = FakeInitialize()
            specs.append(initialize_from_environment(env, initialize=init))
            # JAX's coordinator gets its own port on the megascale coordinator's host
            assert init.calls[0]["coordinator_address"] == "10.0.0.2:8482"
    assert [s.process_id for s in specs] == list(range(8))
    assert {s.num_processes for s in specs} == {8}
    assert [s.is_lead for s in specs] == [True] + [False] * 7
    env = {**four_host_slice(1), "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1"}
    with pytest.raises(DistributedConfigError, match="MEGASCALE_COORDINATOR_ADDRESS is not set"):
        detect_cluster(env)


def test_generic_environment_and_errors():
    env = {"SKYJAX_COORDINATOR": "10.1.2.3:1234", "SKYJAX_NUM_PROCESSES": "4", "SKYJAX_PROCESS_ID": "2"}
    init = FakeInitialize()
    spec = initialize_from_environment(env, initialize=init)
    assert init.calls == [{"coordinator_address": "10.1.2.3:1234", "num_processes": 4, "process_id": 2}]
    assert spec == ClusterSpec("skyjax", 4, 2, "10.1.2.3:1234")
    with pytest.raises(DistributedConfigError, match="SKYJAX_PROCESS_ID=4 is not in"):
        detect_cluster({**env, "SKYJAX_PROCESS_ID": "4"})
    with pytest.raises(DistributedConfigError, match="SKYJAX_NUM_PROCESSES is not set"):
        detect_cluster({"SKYJAX_COORDINATOR": "10.1.2.3:1234", "SKYJAX_PROCESS_ID": "0"})
    with pytest.raises(DistributedConfigError, match="must be host:port"):
        detect_cluster({**env, "SKYJAX_COORDINATOR": "10.1.2.3"})
    with pytest.raises(DistributedConfigError, match="TPU_WORKER_ID is not set"):
        detect_cluster({"TPU_WORKER_HOSTNAMES": HOSTS})
    with pytest.raises(DistributedConfigError, match="TPU_WORKER_ID=4 is not in"):
        detect_cluster(four_host_slice(4))
    with pytest.raises(DistributedConfigError, match="TPU_WORKER_ID='x' is not an integer"):
        detect_cluster(four_host_slice("x"))


def test_single_host_is_a_no_op_and_tpu_vm_lets_jax_read_metadata():
    for env in ({}, {"TPU_WORKER_HOSTNAMES": "localhost"}, {**four_host_slice(2), "SKYJAX_DISTRIBUTED": "0"},
                {"SKYJAX_COORDINATOR": "h:1", "SKYJAX_NUM_PROCESSES": "1", "SKYJAX_PROCESS_ID": "0"}):
        init = FakeInitialize()
        spec = initialize_from_environment(env, initialize=init, tpu_chips=False)
        assert init.calls == [] and not spec.multi_host and spec.is_lead, env
    # a gcloud-created TPU VM: chips attached, no variables -> jax.distributed.initialize() reads the metadata
    init = FakeInitialize()
    spec = initialize_from_environment({}, initialize=init, tpu_chips=True)
    assert init.calls == [{}] and spec.source == "tpu-metadata"


def test_host_shards_partition_the_rows():
    for rows, hosts in [(64, 4), (10, 4), (3, 4), (0, 2), (1000, 8)]:
        shards = [host_shard(rows, i, hosts) for i in range(hosts)]
        covered = [r for s in shards for r in range(rows)[s]]
        assert covered == list(range(rows)), (rows, hosts)  # in order, no gaps, no overlaps
        sizes = [s.stop - s.start for s in shards]
        assert max(sizes) - min(sizes) <= 1
    assert host_shard(64, 2, 4) == slice(32, 48)
    assert host_shard(10, 0, 4) == slice(0, 3) and host_shard(10, 3, 4) == slice(8, 10)
    with pytest.raises(ValueError, match="10 rows do not split evenly over 4 hosts"):
        host_shard(10, 0, 4, even=True)
    with pytest.raises(ValueError, match="process index 4 is not in"):
        host_shard(10, 4, 4)
    assert host_shard(7) == slice(0, 7)  # this test process: one host of one


def test_lead_only_output(monkeypatch, capsys):
    import jax

    lead_only_print("from lead", process_index=0)
    lead_only_print("from host 3", process_index=3)
    assert capsys.readouterr().out == "from lead\n"
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    assert not is_lead_host()
    lead_only_print("hidden")
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert is_lead_host()

    def records(index):
        f = LeadHostFilter(process_index=index)
        out = []
        for level, msg in ((logging.INFO, "step 10"), (logging.WARNING, "slow input")):
            rec = logging.LogRecord("skyjax", level, __file__, 1, msg, None, None)
            if f.filter(rec):
                out.append(rec.getMessage())
        return out

    assert records(0) == ["step 10", "slow input"]
    assert records(3) == ["[host 3] slow input"]


def test_cli_joins_the_pod_before_pod_commands(monkeypatch, capsys):
    """`skyjax train` (and score / eval / generate / convert / export) join the job from the environment before any
    JAX work: a broken cluster environment stops the command with the variable named; `skyjax aot` never joins."""
    from skyjax import cli
    from skyjax.parallel import distributed

    monkeypatch.setenv("SKYJAX_COORDINATOR", "127.0.0.1:8476")
    monkeypatch.setenv("SKYJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("SKYJAX_PROCESS_ID", "7")
    assert cli.main(["train", "configs/demo/reward_model.yaml", "--run-dir", "/nonexistent/run"]) == 2
    assert "SKYJAX_PROCESS_ID=7 is not in" in capsys.readouterr().err

    joined = []
    monkeypatch.setattr(distributed, "initialize_from_environment", lambda: joined.append(True))
    cli.main(["aot", "/nonexistent/config.yaml", "--topology", "v5e:2x2"])  # fails on the missing file, alone
    assert joined == []
    assert cli.main(["score", "--model", "/nonexistent/model", "--data", "x.jsonl", "--out", "y.jsonl"]) == 2
    assert joined == [True]  # joined first, then failed on the missing model
    assert cli.MULTI_HOST_COMMANDS == {"train", "score", "eval", "generate", "convert", "export"}
