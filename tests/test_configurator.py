"""configurator.py as the scripts use it: exec'd at the top of a script run as a subprocess."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = f"""
import json, os
batch_size = 4
learning_rate = 1e-3
compile = True  # train.py has one; it must not shadow the builtin inside the configurator
dataset = 'shapes'
init_from = None
betas = (0.9, 0.95)
exec(open({os.path.join(ROOT, 'configurator.py')!r}).read())
print(json.dumps(dict(batch_size=batch_size, learning_rate=learning_rate, compile=compile, dataset=dataset,
                      init_from=init_from, betas=betas, names=sorted(k for k in globals() if not k.startswith('__')))))
"""


def run(tmp_path, *args):
    (tmp_path / "script.py").write_text(SCRIPT)
    return subprocess.run([sys.executable, "script.py", *args], cwd=tmp_path, capture_output=True, text=True)


def ok(tmp_path, *args):
    p = run(tmp_path, *args)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_defaults_untouched(tmp_path):
    out = ok(tmp_path)
    assert out["batch_size"] == 4 and out["compile"] is True and out["init_from"] is None
    # the configurator leaves nothing of its own behind in the caller's globals
    names = ["batch_size", "learning_rate", "compile", "dataset", "init_from", "betas", "json", "os"]
    assert out["names"] == sorted(names)


def test_both_argument_forms(tmp_path):
    out = ok(tmp_path, "--batch_size=8", "--learning_rate", "3e-4", "--compile=False", "--betas", "(0.8, 0.99)")
    assert out["batch_size"] == 8 and out["learning_rate"] == 3e-4 and out["compile"] is False
    assert out["betas"] == [0.8, 0.99]


def test_value_rules(tmp_path):
    # an int is fine for a float (and becomes one); a str default takes the raw text; a None default takes anything
    out = ok(tmp_path, "--learning_rate=1", "--dataset=(1, 2)", "--init_from=out/ckpt.pt")
    assert out["learning_rate"] == 1.0 and isinstance(out["learning_rate"], float)
    assert out["dataset"] == "(1, 2)" and out["init_from"] == "out/ckpt.pt"
    assert ok(tmp_path, "--init_from=3")["init_from"] == 3


def test_config_file_then_args(tmp_path):
    (tmp_path / "cfg.py").write_text("import math\nbatch_size = 2 * 16\ndataset = 'tars'\nlearning_rate = 5e-4\n")
    out = ok(tmp_path, "cfg.py", "--learning_rate=1e-4")  # later arguments win
    assert out["batch_size"] == 32 and out["dataset"] == "tars" and out["learning_rate"] == 1e-4


def error(tmp_path, *args):
    p = run(tmp_path, *args)
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


@pytest.mark.parametrize("arg, words", [
    ("--batch_size=1.5", ["batch_size", "int", "1.5"]),
    ("--batch_size=abc", ["batch_size", "int", "abc"]),
    ("--compile=1", ["compile", "bool", "1"]),
    ("--learning_rate=fast", ["learning_rate", "float", "fast"]),
    ("--betas=0.9", ["betas", "tuple", "0.9"]),
])
def test_bad_values(tmp_path, arg, words):
    line = error(tmp_path, arg)
    assert all(w in line for w in words), line


def test_unknown_key_suggests(tmp_path):
    line = error(tmp_path, "--learnig_rate=1e-4")
    assert "learnig_rate" in line and "learning_rate" in line
    line = error(tmp_path, "--batchsize", "8")
    assert "batch_size" in line


def test_bad_config_files(tmp_path):
    assert "missing.py" in error(tmp_path, "missing.py")
    (tmp_path / "typo.py").write_text("batch_sise = 8\n")
    assert "batch_size" in error(tmp_path, "typo.py")
    (tmp_path / "wrong.py").write_text("compile = 'yes'\n")
    assert "bool" in error(tmp_path, "wrong.py")
    (tmp_path / "broken.py").write_text("batch_size = (\n")
    assert "SyntaxError" in error(tmp_path, "broken.py")


def test_missing_value(tmp_path):
    assert "--batch_size" in error(tmp_path, "--batch_size")
