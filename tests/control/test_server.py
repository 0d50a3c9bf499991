"""The policy server and client: openpi's client drives the server unchanged, actions over the
wire equal a local Controller's, resets, malformed requests never disturb an episode, concurrent
clients, ``/healthz``, the CLI wiring and the wire format."""

from __future__ import annotations

import socket
import threading
import urllib.request

import msgpack
import numpy as np
import pytest
from websockets.sync.client import connect

from policy_accel import cli
from policy_accel.control import Controller, PolicyClient, PolicyServer, ServerError, WireError
from policy_accel.control import server as server_module
from policy_accel.control.wire import RESET_KEY, pack, unpack

PICARD = {"method": "picard", "tolerance": 1e-4, "seed": 3}
SEQUENTIAL = {"method": "sequential", "seed": 5}
MAX_MESSAGE_BYTES = 64 * 1024


def observations(seed: int, n: int) -> list[np.ndarray]:
    """PushT keypoint observations (20 coordinates in the workspace's pixel range)."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.0, 512.0, 20).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def picard_server(tiny_pusht_policy):
    server = PolicyServer(
        tiny_pusht_policy,
        host="127.0.0.1",
        port=0,
        max_workers=2,
        max_message_bytes=MAX_MESSAGE_BYTES,
        **PICARD,
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def sequential_server(tiny_pusht_policy):
    server = PolicyServer(
        tiny_pusht_policy,
        host="127.0.0.1",
        port=0,
        max_message_bytes=MAX_MESSAGE_BYTES,
        **SEQUENTIAL,
    )
    with server:
        yield server


# --- protocol ---------------------------------------------------------------------------------


# openpi-client 0.1.2 calls websockets' connect() directly, which websockets 17.1 deprecates
@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
def test_openpi_client_drives_the_server_unchanged(picard_server):
    websocket_client_policy = pytest.importorskip(
        "openpi_client.websocket_client_policy",
        reason="openpi-client is not installed (`make` installs it with --no-deps)",
    )
    client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", picard_server.port)
    try:
        metadata = client.get_server_metadata()
        assert metadata["protocol"] == "openpi"
        assert metadata["observation_spec"] == {"obs": [20]}
        assert (metadata["action_dim"], metadata["n_action_steps"]) == (2, 8)
        assert metadata["reset_key"] == RESET_KEY
        first, second = (client.infer({"obs": obs}) for obs in observations(0, 2))
        for reply in (first, second):
            assert reply["actions"].shape == (8, 2) and reply["actions"].dtype == np.float32
            assert reply["server_timing"]["infer_ms"] > 0
            assert set(reply["policy_timing"]) >= {"infer_ms", "rounds", "model_evals", "warm"}
        assert "prev_total_ms" not in first["server_timing"]  # as openpi: no previous request
        assert second["server_timing"]["prev_total_ms"] > 0
        assert second["policy_timing"]["warm"]
        with pytest.raises(RuntimeError, match=r"expected \(20,\)"):  # openpi's text-frame error
            client.infer({"obs": np.zeros(3, np.float32)})
        assert client.infer({"obs": observations(1, 1)[0]})["actions"].shape == (8, 2)
    finally:
        client._ws.close()  # the openpi client has no close()


def test_actions_over_the_wire_equal_a_local_controller(tiny_pusht_policy, picard_server):
    local = Controller(tiny_pusht_policy, **PICARD)
    with PolicyClient("127.0.0.1", picard_server.port) as client:
        for obs in observations(2, 5):
            np.testing.assert_array_equal(
                client.infer({"obs": obs})["actions"], local.plan(obs).chunk
            )


def test_a_new_connection_and_the_reset_key_start_a_new_episode(tiny_pusht_policy, picard_server):
    first_obs, *rest = observations(3, 4)
    with PolicyClient("127.0.0.1", picard_server.port) as client:
        for obs in (first_obs, *rest):
            client.infer({"obs": obs})
    local = Controller(tiny_pusht_policy, **PICARD)
    with PolicyClient("127.0.0.1", picard_server.port) as client:
        first = client.infer({"obs": first_obs})
        assert not first["policy_timing"]["warm"]  # fresh history, fresh noise, cold solve
        np.testing.assert_array_equal(first["actions"], local.plan(first_obs).chunk)
        client.infer({"obs": rest[0]})
        local.plan(rest[0])

        assert client.reset() == {"reset": True}
        local.reset()  # the generator continues its stream on both sides
        np.testing.assert_array_equal(
            client.infer({"obs": rest[1]})["actions"], local.plan(rest[1]).chunk
        )

        reply = client.infer({"obs": rest[2], RESET_KEY: True})  # reset, then plan
        local.reset()
        assert reply["reset"] and not reply["policy_timing"]["warm"]
        np.testing.assert_array_equal(reply["actions"], local.plan(rest[2]).chunk)


# --- robustness -------------------------------------------------------------------------------


def _array_marker(dtype: str, data: bytes, shape: list) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def _malformed_requests(rng: np.random.Generator, good: np.ndarray) -> list[bytes | str]:
    """One request of every kind the server must refuse (each answered with a text frame)."""
    packed = pack({"obs": good})
    nan, inf = good.copy(), good.copy()
    nan[int(rng.integers(20))], inf[0] = np.nan, np.inf
    return [
        rng.bytes(int(rng.integers(1, 64))),  # random bytes
        packed[: int(rng.integers(1, len(packed)))],  # truncated msgpack
        packed + b"\x01",  # trailing data
        "text frame",
        pack([1, 2, 3]),
        pack(7),
        pack({}),
        pack({"state": good}),
        pack({"obs": good, "goal": good}),
        pack({"obs": good[:19]}),
        pack({"obs": np.stack([good, good])}),
        pack({"obs": nan}),
        pack({"obs": inf}),
        pack({"obs": good.astype(np.float64) * 1e300}),  # overflows float32
        pack({"obs": np.array(["x"] * 20)}),
        pack({"obs": np.ones(20, dtype=bool)}),
        pack({"obs": good.tolist()}),
        pack({RESET_KEY: "yes", "obs": good}),
        msgpack.packb({"obs": _array_marker("|O", b"\0" * 160, [20])}),
        msgpack.packb({"obs": _array_marker("<c8", b"\0" * 160, [20])}),
        msgpack.packb({"obs": _array_marker("|V8", b"\0" * 160, [20])}),
        msgpack.packb({"obs": _array_marker("<f4", b"\0" * 40, [20])}),  # length mismatch
        msgpack.packb({"obs": _array_marker("<f4", b"\0" * 80, [10**12])}),  # huge shape
        msgpack.packb({"obs": _array_marker("nonsense", b"\0" * 80, [20])}),
        pack({"obs": np.full(20, 1e30, np.float32)}),  # finite, but no model takes it
        pack({"obs": good, "x" * 5000: 1}),  # a long unknown key
        msgpack.packb({"obs": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}}}),
        msgpack.packb({"obs": [None] * 5000}),  # a long list
        msgpack.packb({f"k{i}": None for i in range(300)}),  # too many keys in one map
        msgpack.packb({"obs": [[None] * 1000] * 10}),  # too many entries in all
    ]


def test_malformed_requests_never_disturb_the_episode(tiny_pusht_policy, sequential_server):
    rng = np.random.default_rng(4)
    good_observations = observations(5, 40)
    local = Controller(tiny_pusht_policy, **SEQUENTIAL)
    refused, planned = 0, 0
    with connect(f"ws://127.0.0.1:{sequential_server.port}", max_size=None) as connection:
        assert unpack(connection.recv(timeout=10))["protocol"] == "openpi"
        for obs in good_observations:
            for request in _malformed_requests(rng, obs):
                connection.send(request)
                reply = connection.recv(timeout=10)
                assert isinstance(reply, str), f"{request[:40]!r} was not refused"
                refused += 1
            connection.send(pack({"obs": obs}))
            reply = connection.recv(timeout=10)
            assert isinstance(reply, bytes), reply
            np.testing.assert_array_equal(unpack(reply)["actions"], local.plan(obs).chunk)
            planned += 1
    assert refused >= 1000 and planned == len(good_observations)
    with PolicyClient("127.0.0.1", sequential_server.port) as client:  # still serving
        assert client.infer({"obs": good_observations[0]})["actions"].shape == (8, 2)


def test_refusals_name_the_problem_and_the_expected_shape(picard_server):
    with PolicyClient("127.0.0.1", picard_server.port) as client:
        good = observations(6, 1)[0]
        cases = [
            ({"obs": good[:3]}, r"obs\['obs'\] has shape \(3,\), expected \(20,\)"),
            ({"state": good}, r"missing key\(s\) \['obs'\] and unexpected key\(s\) \['state'\]"),
            ({"obs": np.full(20, np.nan, np.float32)}, "NaN or Inf"),
            ({"obs": np.array(["a"] * 20)}, "expected a real number array"),
            ({"obs": np.full(20, 1e30, np.float32)}, "range this policy was trained on"),
        ]
        for request, message in cases:
            with pytest.raises(ServerError, match=message):
                client.infer(request)
        assert client.infer({"obs": good})["actions"].shape == (8, 2)


def test_a_client_leaving_mid_request_does_not_hurt_the_server(picard_server):
    with connect(f"ws://127.0.0.1:{picard_server.port}") as connection:
        connection.recv(timeout=10)
        connection.send(pack({"obs": observations(7, 1)[0]}))  # and leave before the reply
    with PolicyClient("127.0.0.1", picard_server.port) as client:
        assert client.infer({"obs": observations(8, 1)[0]})["actions"].shape == (8, 2)


def test_concurrent_clients_get_independent_streams(tiny_pusht_policy, picard_server):
    streams = {seed: observations(seed, 4) for seed in (10, 11)}
    replies: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(streams))

    def run(seed: int) -> None:
        try:
            with PolicyClient("127.0.0.1", picard_server.port) as client:
                barrier.wait(timeout=10)
                replies[seed] = [client.infer({"obs": obs})["actions"] for obs in streams[seed]]
        except BaseException as error:  # re-raised in the test thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for seed, stream in streams.items():
        local = Controller(tiny_pusht_policy, **PICARD)
        for actions, obs in zip(replies[seed], stream, strict=True):
            np.testing.assert_array_equal(actions, local.plan(obs).chunk)


def test_healthz_answers_200(picard_server):
    url = f"http://127.0.0.1:{picard_server.port}/healthz"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.read().strip() == b"OK"


# --- client and command line ------------------------------------------------------------------


def test_client_names_an_unreachable_server():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        PolicyClient("127.0.0.1", port, timeout=5)


def test_server_refuses_unknown_solver_options(tiny_pusht_policy):
    with pytest.raises(TypeError, match="unknown option"):
        PolicyServer(tiny_pusht_policy, port=0, method="sequential", tolerance=1e-3)


def test_serve_command_builds_one_sampler_config(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        server_module, "serve", lambda *args, **kwargs: calls.append((args, kwargs)) or 15
    )
    argv = ["serve", "ckpt", "--port", "0", "--method", "taa", "--no-warm-start"]
    argv += ["--budget-ms", "20", "--tolerance", "1e-3", "--max-message-mb", "1"]
    assert cli.main(argv) == 128 + 15  # stopped by SIGTERM: the shell's code for it
    ((args, kwargs),) = calls
    checkpoint, sampler = args
    assert checkpoint == "ckpt" and kwargs["port"] == 0 and kwargs["host"] == "127.0.0.1"
    assert (sampler.method, sampler.warm_start, sampler.budget_ms) == ("taa", False, 20.0)
    assert sampler.options == {"tolerance": 1e-3}
    assert kwargs["max_message_bytes"] == 1024 * 1024
    # a sampler config with the flags on top: DDIM-10 run by picard
    calls.clear()
    assert cli.main(["serve", "ckpt", "--sampler", "ddim10", "--method", "picard"]) == 143
    sampler = calls[0][0][1]
    assert (sampler.scheduler, sampler.num_inference_steps, sampler.method) == (
        "ddim",
        10,
        "picard",
    )
    assert cli.main(["serve", "ckpt", "--method", "fast"]) == 2  # refused before serving


def test_the_server_plans_with_its_sampler_config(tiny_pusht_policy):
    from policy_accel.control import SamplerConfig

    sampler = SamplerConfig(method="picard", scheduler="ddim", num_inference_steps=4)
    with PolicyServer(tiny_pusht_policy, sampler, port=0, seed=2) as server:
        assert server.metadata["scheduler"] == "DDIMScheduler"
        assert server.metadata["num_inference_steps"] == 4
        local = Controller(tiny_pusht_policy, sampler, seed=2)
        with PolicyClient("127.0.0.1", server.port) as client:
            for obs in observations(40, 3):
                reply = client.infer({"obs": obs})
                np.testing.assert_array_equal(reply["actions"], local.plan(obs).chunk)
                assert reply["policy_timing"]["rounds"] <= 4


# --- wire format ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.arange(24, dtype=">i8").reshape(2, 3, 4),
        np.zeros((0, 5), np.float64),
        np.array(2.5, np.float16),
        np.array([True, False]),
        np.array(["ab", "c"]),
        np.arange(12, dtype=np.uint8).reshape(3, 4).T,  # not contiguous
        np.float32(1.5),
        np.int64(-3),
        np.bool_(True),
    ],
    ids=repr,
)
def test_wire_round_trips_arrays_and_scalars(value):
    decoded = unpack(pack({"x": value, "nested": [value, {"y": value}]}))
    for item in (decoded["x"], decoded["nested"][0], decoded["nested"][1]["y"]):
        assert type(item) is type(value) and item.dtype == value.dtype
        assert np.shape(item) == np.shape(value)
        np.testing.assert_array_equal(item, value)


def test_wire_matches_openpi_msgpack_numpy_byte_for_byte():
    msgpack_numpy = pytest.importorskip("openpi_client.msgpack_numpy")
    message = {"obs": np.arange(20, dtype=np.float32), "step": np.int32(4), "text": "hi"}
    assert pack(message) == msgpack_numpy.packb(message)
    np.testing.assert_array_equal(unpack(msgpack_numpy.packb(message))["obs"], message["obs"])


@pytest.mark.parametrize("dtype", ["|O", "<c8", "<c16", "|V4", "f4,i4"])
def test_wire_refuses_object_void_and_complex_dtypes(dtype):
    itemsize = np.dtype(dtype).itemsize
    with pytest.raises(WireError, match=r"message\['x'\]\['y'\] has dtype"):
        unpack(msgpack.packb({"x": {"y": _array_marker(dtype, b"\0" * itemsize, [1])}}))
    with pytest.raises(WireError, match=r"message\['x'\] has dtype"):
        pack({"x": np.zeros(1, dtype)})


def test_wire_refuses_a_length_that_does_not_match_the_shape():
    with pytest.raises(WireError, match=r"shape \(3, 4\) of dtype <f4 needs 48 bytes, but 44"):
        unpack(msgpack.packb({"x": _array_marker("<f4", b"\0" * 44, [3, 4])}))
    with pytest.raises(WireError, match="needs 4000000000000 bytes"):
        unpack(msgpack.packb({"x": _array_marker("<f4", b"\0" * 8, [10**12])}))


def test_wire_refuses_malformed_msgpack_and_oversized_messages():
    with pytest.raises(WireError, match="malformed msgpack"):
        unpack(pack({"x": np.zeros(4)})[:-3])
    with pytest.raises(WireError, match="exceeds the limit of 10 bytes"):
        unpack(pack({"x": np.zeros(4)}), max_bytes=10)


# --- hostile input and limits -----------------------------------------------------------------


def _healthz_ms(port: int) -> float:
    import time

    start = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        assert response.status == 200
    return (time.perf_counter() - start) * 1e3


def _crafted_bodies(size: int) -> dict[str, bytes]:
    """Requests within an 8 MiB limit that once stalled the event loop for seconds to minutes."""
    nested: object = [None] * 200_000
    for level in range(31):
        nested = {f"key{level}" * 400: nested}
    array = {b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [0]}
    return {
        "millions of nils": msgpack.packb([None] * (size - 16)),
        "nested maps around nils": msgpack.packb(nested),
        "empty arrays": msgpack.packb([array] * (size // 48)),
        "many unknown keys": msgpack.packb({f"k{i}": None for i in range(size // 12)}),
        "many small lists": msgpack.packb([[None] * 100] * (size // 110)),
    }


def test_crafted_requests_are_refused_fast_while_healthz_answers(tiny_pusht_policy):
    import time

    limit = 8 * 1024 * 1024
    with PolicyServer(tiny_pusht_policy, port=0, max_message_bytes=limit, **SEQUENTIAL) as server:
        local = Controller(tiny_pusht_policy, **SEQUENTIAL)
        stop, worst = threading.Event(), [0.0]

        def poll() -> None:
            while not stop.is_set():
                worst[0] = max(worst[0], _healthz_ms(server.port))
                time.sleep(0.01)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            with connect(f"ws://127.0.0.1:{server.port}", max_size=None) as connection:
                connection.recv(timeout=10)
                for name, body in _crafted_bodies(limit - 64).items():
                    assert len(body) <= limit, name
                    start = time.perf_counter()
                    connection.send(body)
                    reply = connection.recv(timeout=30)
                    assert isinstance(reply, str) and len(reply) <= 2000, name
                    assert time.perf_counter() - start < 2.0, name
                obs = observations(30, 1)[0]
                connection.send(pack({"obs": obs}))
                np.testing.assert_array_equal(
                    unpack(connection.recv(timeout=30))["actions"], local.plan(obs).chunk
                )
        finally:
            stop.set()
            poller.join()
    assert worst[0] < 500, f"/healthz took {worst[0]:.0f} ms"  # the fuzz bench holds 100 ms


def test_an_oversized_frame_closes_only_its_own_connection(tiny_pusht_policy, picard_server):
    from websockets.exceptions import ConnectionClosed

    with connect(f"ws://127.0.0.1:{picard_server.port}", max_size=None) as connection:
        connection.recv(timeout=10)
        connection.send(pack({"obs": np.zeros(MAX_MESSAGE_BYTES // 4 + 1, np.float32)}))
        with pytest.raises(ConnectionClosed) as closed:
            connection.recv(timeout=10)
        assert closed.value.rcvd.code == 1009  # message too big
    with PolicyClient("127.0.0.1", picard_server.port) as client:
        assert client.infer({"obs": observations(31, 1)[0]})["actions"].shape == (8, 2)


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
def test_the_api_key_is_required_when_set(tiny_pusht_policy):
    with PolicyServer(tiny_pusht_policy, port=0, api_key="s3cret", **SEQUENTIAL) as server:
        for key in (None, "wrong"):
            with pytest.raises(ConnectionError, match="HTTP 401.*Api-Key"):
                PolicyClient("127.0.0.1", server.port, api_key=key)
        with PolicyClient("127.0.0.1", server.port, api_key="s3cret") as client:
            assert client.infer({"obs": observations(32, 1)[0]})["actions"].shape == (8, 2)
        assert _healthz_ms(server.port) > 0  # probes need no key
        policy_module = pytest.importorskip("openpi_client.websocket_client_policy")
        openpi = policy_module.WebsocketClientPolicy("127.0.0.1", server.port, api_key="s3cret")
        try:
            assert openpi.infer({"obs": observations(33, 1)[0]})["actions"].shape == (8, 2)
        finally:
            openpi._ws.close()


def test_connections_beyond_the_cap_are_turned_away(tiny_pusht_policy):
    with PolicyServer(tiny_pusht_policy, port=0, max_connections=2, **SEQUENTIAL) as server:
        first = PolicyClient("127.0.0.1", server.port)
        second = PolicyClient("127.0.0.1", server.port)
        with pytest.raises(ConnectionError, match="HTTP 503"):
            PolicyClient("127.0.0.1", server.port)
        first.close()
        for _ in range(100):  # the server sees the close shortly after
            if server.connections < 2:
                break
            threading.Event().wait(0.02)
        with PolicyClient("127.0.0.1", server.port) as third:
            assert third.infer({"obs": observations(34, 1)[0]})["actions"].shape == (8, 2)
        second.close()


def test_serving_beyond_loopback_without_a_key_warns(tiny_pusht_policy, caplog):
    assert PolicyServer(tiny_pusht_policy, port=0).host == "127.0.0.1"  # the default
    with caplog.at_level("WARNING", logger="policy_accel.control.server"):
        with PolicyServer(tiny_pusht_policy, host="0.0.0.0", port=0, **SEQUENTIAL):
            pass
    assert "without an API key" in caplog.text


def test_sigterm_stops_the_server_within_a_second_even_mid_plan(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.shared_fixtures import ROOT

    process = subprocess.Popen(
        [sys.executable, "-m", "policy_accel", "serve", str(ROOT / "checkpoints/pusht_keypoints"),
         "--port", "0", "--method", "newton"],  # a slow plan to be in flight
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert "serving" in line, line + process.stderr.read()
        port = int(line.split("ws://127.0.0.1:")[1].split()[0])
        with connect(f"ws://127.0.0.1:{port}") as connection:
            connection.recv(timeout=10)
            connection.send(pack({"obs": np.full(20, 250.0, np.float32)}))
            time.sleep(0.5)  # the plan runs (a cold newton plan takes seconds here)
            start = time.perf_counter()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
            assert time.perf_counter() - start < 1.5
    finally:
        process.kill()
        process.communicate()


def test_a_request_says_what_was_executed_and_committed_since_the_last_reply(
    tiny_pusht_policy, picard_server
):
    from policy_accel.control.wire import COMMITTED_KEY, EXECUTED_KEY

    local = Controller(tiny_pusht_policy, **PICARD)
    first_obs, second_obs = observations(7, 2)
    with PolicyClient("127.0.0.1", picard_server.port) as client:
        assert client.metadata["executed_key"] == EXECUTED_KEY
        first = client.infer({"obs": first_obs})
        reply = client.infer({"obs": second_obs, EXECUTED_KEY: 2, COMMITTED_KEY: 3})
        assert reply["policy_timing"]["committed"] == 3
        # the new chunk continues the three actions the robot executes while it is planned
        np.testing.assert_allclose(reply["actions"][:3], first["actions"][2:5], atol=1e-3)
        local.plan(first_obs)
        expected = local.plan(second_obs, executed=2, committed=local.last_plan.future[0, 2:5])
        np.testing.assert_array_equal(reply["actions"], expected.chunk)
        assert expected.record.shift == 2
        with pytest.raises(ServerError, match="'__committed__' must be an int between 0 and 4096"):
            client.infer({"obs": second_obs, COMMITTED_KEY: -1})
        ok = client.infer({"obs": second_obs})  # a refused request changed nothing
        assert ok["policy_timing"]["committed"] == 0


def test_steps_sent_between_plans_keep_the_history_consecutive(tiny_pusht_policy, picard_server):
    from policy_accel.control.wire import EXECUTED_KEY

    steps = observations(9, 9)
    local = Controller(tiny_pusht_policy, **PICARD)
    plans = [step.plan for step in map(local.step, steps) if step.plan is not None]
    assert len(plans) == 2  # at the first step and after 8 executed actions
    with PolicyClient("127.0.0.1", picard_server.port) as client:
        first = client.infer({"obs": steps[0]})
        for obs in steps[1:8]:
            assert client.observe({"obs": obs}) == {"observed": True}
        second = client.infer({"obs": steps[8], EXECUTED_KEY: 8})
        with pytest.raises(ServerError, match="'__observe__' needs the observation keys"):
            client.infer({"__observe__": True})
    np.testing.assert_array_equal(first["actions"], plans[0].chunk)
    np.testing.assert_array_equal(second["actions"], plans[1].chunk)
    assert plans[1].record.shift == 8 and second["policy_timing"]["warm"]


def test_timing_keys_the_last_reply_cannot_honour_are_refused(tiny_pusht_policy, picard_server):
    """``__executed__`` + ``__committed__`` count actions of the last reply: more than it held,
    keys on a request that plans nothing, and keys with no reply before them are refused with
    the counts and the limit, and change nothing."""
    from policy_accel.control.wire import COMMITTED_KEY, EXECUTED_KEY, OBSERVE_KEY, OVERLAP_KEY

    first_obs, second_obs, third_obs = observations(11, 3)
    local = Controller(tiny_pusht_policy, **PICARD)
    with PolicyClient("127.0.0.1", picard_server.port) as client:
        for keys in ({EXECUTED_KEY: 0}, {COMMITTED_KEY: 2}, {OVERLAP_KEY: True}):
            with pytest.raises(ServerError, match="there is none yet"):
                client.infer({"obs": first_obs, **keys})  # the connection's first request
        first = client.infer({"obs": first_obs})
        np.testing.assert_array_equal(first["actions"], local.plan(first_obs).chunk)
        cases = [
            ({EXECUTED_KEY: 6, COMMITTED_KEY: 4}, r"'__executed__'=6 \+ '__committed__'=4 = 10"
             " actions, but the last reply held 8"),
            ({EXECUTED_KEY: 14, COMMITTED_KEY: 4}, "= 18 actions, but the last reply held 8"),
            ({COMMITTED_KEY: 4096}, "= 4096 actions, but the last reply held 8"),
            ({EXECUTED_KEY: 9}, "= 9 actions, but the last reply held 8"),
            ({OBSERVE_KEY: True, COMMITTED_KEY: 2}, "this request is an '__observe__' step"),
            ({RESET_KEY: True, EXECUTED_KEY: 2}, "there is none yet"),
        ]  # fmt: skip
        for keys, message in cases:
            with pytest.raises(ServerError, match=message):
                client.infer({"obs": second_obs, **keys})
        with pytest.raises(ServerError, match="a reset alone, which plans nothing"):
            client.infer({RESET_KEY: True, COMMITTED_KEY: 1})
        # nothing of that changed the episode: the next request plans as if none came
        reply = client.infer({"obs": second_obs, EXECUTED_KEY: 5, COMMITTED_KEY: 3})
        expected = local.plan(second_obs, executed=5, committed=local.last_plan.future[0, 5:8])
        np.testing.assert_array_equal(reply["actions"], expected.chunk)
        timing = reply["policy_timing"]
        assert (timing["executed"], timing["committed"], timing["overlap"]) == (5, 3, False)
        followed = client.infer({"obs": third_obs, EXECUTED_KEY: 2, OVERLAP_KEY: True})
        assert followed["policy_timing"]["overlap"] is True
        # reset + observe: the reply says it reset
        assert client.infer({"obs": third_obs, RESET_KEY: True, OBSERVE_KEY: True}) == {
            "observed": True,
            "reset": True,
        }


def test_far_out_of_range_observations_are_refused_or_flagged(tiny_pusht_policy, picard_server):
    """PushT keypoints of 404,032 px were served with actions at the workspace's edge: refused
    by default (naming key, value and bound), served with a flag where the server opted in."""
    obs = observations(12, 1)[0]
    far = obs.copy()
    far[3] = 404_032.0
    with PolicyClient("127.0.0.1", picard_server.port) as client:
        with pytest.raises(ServerError, match=r"obs\['obs'\]\[3\] = 404032 lies at .* -10 to 11"):
            client.infer({"obs": far})
        assert "out_of_range" not in client.infer({"obs": obs})
    with PolicyServer(tiny_pusht_policy, port=0, out_of_range="flag", **SEQUENTIAL) as server:
        assert server.metadata["out_of_range"] == "flag"
        with PolicyClient("127.0.0.1", server.port) as client:
            reply = client.infer({"obs": far})
            assert reply["actions"].shape == (8, 2)
            assert "obs['obs'][3] = 404032" in reply["out_of_range"]["obs"]
            assert "out_of_range" not in client.infer({"obs": obs})
            flagged = client.observe({"obs": far})
            assert flagged["observed"] and "obs" in flagged["out_of_range"]
