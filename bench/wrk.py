"""Load from wrk (C, so the generator takes little of the 2 cores the server shares): every
request is a distinct pre-signed event, split between wrk's threads so none is sent twice."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_SCRIPT = """
local requests, n = {}, 0
function setup(thread)
  thread:set("id", n)
  n = n + 1
end
function init(args)
  local threads, index = tonumber(args[2]), 0
  for line in io.lines(args[1]) do
    if index % threads == id then
      local tab = line:find("\\t", 1, true)
      requests[#requests + 1] = wrk.format("POST", "/webhooks/stripe",
        {["Stripe-Signature"] = line:sub(1, tab - 1), ["Content-Type"] = "application/json"}, line:sub(tab + 1))
    end
    index = index + 1
  end
  n = 0
end
function request()
  n = n % #requests + 1
  return requests[n]
end
"""

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def available() -> bool:
    return shutil.which("wrk") is not None


def run(port: int, bodies: list[tuple[bytes, str]], connections: int, seconds: float) -> dict[str, float]:
    """events/s, p50 ms, p99 ms and non-2xx answers. `bodies` must outnumber what the server can
    take in `seconds`, or wrk starts again from the first (and the consumer sees duplicates)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-wrk-"))
    (folder / "post.lua").write_text(_SCRIPT)
    with open(folder / "events.tsv", "wb") as lines:
        for body, signature in bodies:
            lines.write(signature.encode() + b"\t" + body + b"\n")
    threads = 2
    output = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{round(seconds)}s",
            "--latency",
            "-s",
            str(folder / "post.lua"),
            f"http://127.0.0.1:{port}",
            "--",
            str(folder / "events.tsv"),
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shutil.rmtree(folder)
    percentiles = {
        share: float(value) * _UNITS[unit]
        for share, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)$", output, re.MULTILINE)
    }
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests": float(re.search(r"(\d+) requests in", output).group(1)),  # type: ignore[union-attr]
        "events/s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "p50 ms": percentiles["50"],
        "p99 ms": percentiles["99"],
        "errors": float(errors.group(1)) if errors else 0.0,
    }
