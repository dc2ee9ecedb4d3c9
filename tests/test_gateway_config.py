"""The configuration file: shipped configs load, default.toml documents every key with its
true default, and every mistake is an error naming the key."""
import dataclasses
import glob
import os
import tomllib

import pytest
import torch

from gateway.cli import main
from gateway.config import ARRAYS, SECTIONS, ConfigError, KvgateConfig, build_config, load_config
from tests.test_gateway_server import free_port

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.toml"))), ids=os.path.basename)
def test_shipped_configs_load(path):
    """Each shipped config loads; one made for a GPU is refused without one, naming the key."""
    with open(path, "rb") as f:
        gpu_only = tomllib.load(f).get("model", {}).get("device", "").startswith("cuda")
    if gpu_only and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.device is 'cuda' but no CUDA GPU is available"):
            load_config(path)
    else:
        assert isinstance(load_config(path), KvgateConfig)


def test_default_toml_documents_every_key_with_its_default():
    with open(os.path.join(CONFIGS, "default.toml"), "rb") as f:
        doc = tomllib.load(f)
    for name, cls in SECTIONS.items():
        table = doc
        for part in name.split("."):
            table = table[part]
        assert set(table) == {f.name for f in dataclasses.fields(cls) if f.init}, name
    assert build_config(doc) == KvgateConfig()
    text = open(os.path.join(CONFIGS, "default.toml")).read()     # the [[arrays]] are commented out
    for name, cls in ARRAYS.items():
        for f in dataclasses.fields(cls):
            assert f"# {f.name} =" in text or f"(or {f.name} =" in text, f"{name}.{f.name} undocumented"


def test_set_overrides_take_toml_values_or_bare_strings(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    cfg = load_config(None, ["server.port=9001", f"model.path={tmp_path / 'x'}", 'model.name="my model"',
                             "store.host.num_blocks=64", "store.gpu.memory_fraction=0.5"])
    assert cfg.server.port == 9001 and cfg.model.path == str(tmp_path / "x") and cfg.model.name == "my model"
    assert cfg.store.host.num_blocks == 64 and cfg.store.gpu.memory_fraction == 0.5


@pytest.mark.parametrize("doc,message", [
    ({"sever": {}}, r"unknown section \[sever\]"),
    ({"server": {"prot": 1}},
     r"unknown key server.prot \(did you mean server.port\?\); allowed: admin_api_key, admin_api_key_env, body_timeout_s, heartbeat_timeout_s, "
     "host, max_body_bytes, max_concurrent_sequences, max_response_bytes, max_sequences_per_request, port, "
     "shutdown_timeout_s, write_timeout_s"),
    ({"server": {"port": "8000"}}, "server.port must be int, got str"),
    ({"server": {"port": 70000}}, "server.port must be an int in 1..65535"),
    ({"model": {"dtype": "float64"}}, "model.dtype must be one of auto, float32, bfloat16, float16"),
    ({"store": {"disk": {"write_policy": "lru"}}}, "store.disk.write_policy must be one of auto, all, second-use"),
    ({"store": {"disk": {"enabled": False, "path": "/x"}}}, "store.disk.path must be unset when store.disk.en"),
    ({"store": {"host": {"memory_fraction": 0}}}, r"store.host.memory_fraction must be a float in \(0, 0.9\]"),
    ({"store": {"gpu": {"memory_fraction": 1.5}}}, "store.gpu.memory_fraction"),
    ({"store": {"cpu": {}}}, r"unknown section \[store.cpu\]"),
    ({"tenants": [{"name": "a"}]}, "exactly one of api_key and api_key_env"),
    ({"tenants": [{"name": "a", "api_key_env": "KVGATE_NO_SUCH_VAR"}]}, "KVGATE_NO_SUCH_VAR.*not set"),
    ({"tenants": [{"name": "a", "api_key": "k"}, {"name": "a", "api_key": "j"}]}, "distinct names"),
    ({"tenants": [{"name": "a", "api_key": "k"}, {"name": "b", "api_key": "k"}]}, "distinct api keys"),
    ({"tenants": {"name": "a"}}, "array of tables"),
    ({"public_prefixes": {"text": "a"}}, r"public_prefixes: must be an array of tables \(\[\[public_prefixes\]\]\)"),
    ({"public_prefixes": [{"text": "a", "system": "b"}]}, "public_prefixes must be tables with exactly one of text"),
    ({"public_prefixes": [{}]}, "public_prefixes must be tables with exactly one of text and system"),
    ({"public_prefixes": [{"txt": "a"}]}, "unknown key public_prefixes.txt"),
    ({"tenants": [{"name": "a", "api_key": "k", "priority": 3, "max_priority": 2}]},
     r"tenants\[a\].max_priority must be >= its priority \(3\)"),
    ({"tenants": [{"name": "a", "api_key": "k", "priority": 2**40}]}, r"tenants\[a\].priority must be an int in"),
    ({"server": {"admin_api_key": "k"}, "tenants": [{"name": "a", "api_key": "k"}]},
     "server.admin_api_key must be a key no tenant has"),
    ({"server": {"admin_api_key": "k", "admin_api_key_env": "HOME"}}, "server.admin_api_key must be unset"),
    ({"server": {"max_concurrent_sequences": 8, "max_sequences_per_request": 9}},
     "server.max_sequences_per_request must be an int in 1..server.max_concurrent_sequences"),
    ({"server": {"body_timeout_s": 0}}, "server.body_timeout_s must be a number of seconds > 0"),
    ({"server": 5}, r"\[server\] must be a table"),
    ({"engine": {"max_num_seqs": -1}}, r"engine.max_num_seqs must be >= 0 \(0 = chosen from the machine\)"),
])
def test_config_errors_name_the_key(doc, message):
    with pytest.raises(ConfigError, match=message):
        build_config(doc)


def test_a_chat_template_that_is_not_a_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.chat_template .* is not a file"):
        build_config({"model": {"chat_template": str(tmp_path / "missing.jinja")}})


@pytest.mark.parametrize("override", ["server.port", "port=1", "=3"])
def test_malformed_set_is_an_error(override):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, [override])


def test_cli_reports_config_errors_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'x'\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "server.port must be int" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    (tmp_path / "broken.toml").write_text("[server\n")
    assert main(["serve", "--config", str(tmp_path / "broken.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_a_disk_tier_that_cannot_be_made_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory")
    code = main(["serve", "--port", str(free_port()), "--set", 'model.device="cpu"', "--set", 'model.path="builtin:tiny"',
                 "--set", "store.host.num_blocks=8",
                 "--set", f"store.disk.path={tmp_path / 'a-file' / 'kv'}", "--set", "store.disk.max_bytes=1000000"])
    out = capsys.readouterr()
    assert code == 2 and "serving" not in out.out
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvgate: configuration error: store.disk.path: ")
    assert lines[0].endswith("is not a directory")


def test_a_public_prefix_shorter_than_a_block_is_one_line_and_exit_2(tmp_path, capfd):
    """Found once the prefix is tokenized, at start-up: it would share nothing."""
    (tmp_path / "c.toml").write_text('[model]\ndevice = "cpu"\npath = "builtin:tiny"\n[store.disk]\nenabled = false\n'
                                     '[[public_prefixes]]\ntext = "hi"\n')
    code = main(["serve", "--port", str(free_port()), "--log-level", "warning", "--config", str(tmp_path / "c.toml")])
    out = capfd.readouterr()
    assert code == 2 and "serving" not in out.out and "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvgate: configuration error: public_prefixes[0]: the prefix is"), \
        out.err


@pytest.mark.parametrize("setting,message", [
    ('model.path="dummy:no-such-shape"', "model.path: unknown dummy shape 'no-such-shape'"),
    ("model.max_model_len=100000", "model.max_model_len 100000 exceeds the model's context of 4096")])
def test_a_model_the_engine_process_cannot_load_is_one_line_and_exit_2(setting, message, capfd):
    """Found by the engine process while loading the model: the server prints one line naming
    the key (no traceback from either process) and exits 2."""
    code = main(["serve", "--port", str(free_port()), "--log-level", "warning", "--set", 'model.device="cpu"',
                 "--set", 'model.path="builtin:tiny"', "--set", setting])
    out = capfd.readouterr()
    assert code == 2 and "serving" not in out.out and "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvgate: configuration error: {message}"), out.err


@pytest.mark.parametrize("gpu_memory,gpu_blocks,expected", [
    (None, 2048, (64, 2048)),             # the CPU: compute-bound, small steps
    (141 << 30, 50_000, (256, 4096)),     # an H200: as many sequences as a decode graph takes
    (80 << 30, 2_000, (125, 4096)),       # a small pool: 16 blocks a sequence at least
    (24 << 30, 10_000, (256, 2048)),      # a GPU under 40 GiB: 2,048 tokens a step
    (24 << 30, 8, (1, 2048)),
])
def test_step_limits_left_at_0_are_chosen_from_the_machine(gpu_memory, gpu_blocks, expected):
    from engine.config import EngineConfig
    auto = EngineConfig().resolved(gpu_memory, gpu_blocks)
    assert (auto.max_num_seqs, auto.max_num_batched_tokens) == expected
    mine = EngineConfig(max_num_seqs=3, max_num_batched_tokens=100).resolved(gpu_memory, gpu_blocks)
    assert (mine.max_num_seqs, mine.max_num_batched_tokens) == (3, 100)        # set: kept
    assert auto.describe(EngineConfig(max_num_seqs=3)).startswith(f"max_num_seqs={expected[0]} (configured)")


def test_the_largest_automatic_batch_is_the_largest_decode_graph():
    from engine.config import AUTO_MAX_NUM_SEQS
    from engine.graphs import BUCKETS
    assert AUTO_MAX_NUM_SEQS == BUCKETS[-1]


# ---- the CLI answers before anything heavy loads (issue 27) -------------------------------------

def _cli(*argv: str) -> tuple[int, str, bool]:
    """`kvgate argv` in a fresh interpreter: (exit code, stderr, whether torch was imported)."""
    import subprocess
    import sys
    code = ("import sys\nfrom gateway.cli import main\n"
            f"try:\n    code = main({list(argv)!r})\nexcept SystemExit as e:\n    code = e.code\n"
            "print(code, 'torch' in sys.modules)\n")
    root = os.path.dirname(CONFIGS)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    exit_code, torch_loaded = out.stdout.split()[-2:]
    return int(exit_code), out.stderr, torch_loaded == "True"


@pytest.mark.parametrize("argv", [("--version",), ("--help",), ("serve", "--help"),
                                  ("serve", "--set", "server.prot=9000"), ("serve", "--set", "model.path=/no/model")])
def test_help_version_and_configuration_errors_load_no_torch(argv):
    code, err, torch_loaded = _cli(*argv)
    assert code in (0, 2) and not torch_loaded, err


def test_a_renamed_or_misspelt_key_names_the_closest_one():
    with pytest.raises(ConfigError, match=r"unknown key server.max_concurrent_requests \(did you mean "
                                          r"server.max_concurrent_sequences\?\); allowed: "):
        build_config({"server": {"max_concurrent_requests": 3}})
    with pytest.raises(ConfigError, match=r"unknown section \[stor\] \(did you mean store\?\)"):
        build_config({"stor": {}})
    with pytest.raises(ConfigError, match=r"unknown key server.zzz; allowed"):      # nothing close: no guess
        build_config({"server": {"zzz": 3}})


def test_a_port_in_use_is_one_line_naming_server_port_before_anything_loads():
    import socket
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        code, err, torch_loaded = _cli("serve", "--port", str(held.getsockname()[1]))
    assert code == 2 and not torch_loaded
    assert err.count("\n") == 1 and err.startswith("kvgate: configuration error: server.port: 127.0.0.1:") \
        and "is in use" in err, err
