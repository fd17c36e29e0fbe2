"""Take docs/dashboard.png: the real /admin/ page of a proxy logged in to the simulator.

    python scripts/screenshot.py [--out docs/dashboard.png]

Starts the simulator and a proxy in this process (nothing touches your real tokens),
makes a few calls the way a tool would, and has Debian's headless Chromium
(/usr/bin/chromium, /usr/bin/chromedriver) photograph the page. Nothing is drawn by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from yarl import URL

from closeproxy.config import Secret, Settings
from closeproxy.file_store import FileGrantStore
from closeproxy.grant import TokenSet
from closeproxy.server import running
from closeproxy.sim import SimConfig, run_sim

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS: tuple[str, ...] = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--no-proxy-server",
    "--hide-scrollbars",
    "--window-size=1200,900",
)
# What a tool might do: reads, a create, a miss; queries never reach the page.
CALLS: tuple[tuple[str, str], ...] = (
    ("GET", "/api/v1/me/"),
    ("GET", "/api/v1/lead/?_limit=2&_fields=id,display_name"),
    ("POST", "/api/v1/lead/"),
    ("GET", "/api/v1/lead/?query=acme"),
    ("GET", "/api/v1/lead/lead_doesnotexist/"),
    ("GET", "/api/v1/me/"),
)


def shoot(url: str, out: Path, profile: Path) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        time.sleep(1.2)  # let the countdown script tick once: the picture shows it live
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


async def main(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="closeproxy-shot-") as tmp:
        sim_config = SimConfig()
        async with run_sim(sim_config) as sim:
            token_file = Path(tmp) / "tokens.json"
            now = time.time()
            reply = sim.state.issue_tokens()
            FileGrantStore(token_file).write(
                TokenSet.from_reply(reply, received_at=now, api_url=sim.url)
            )
            settings = Settings(
                client_id=sim_config.client_id,
                client_secret=Secret(sim_config.client_secret),
                api_url=URL(sim.url),
                app_url=URL(sim.url),
                host="127.0.0.1",
                port=0,
                token_file=token_file,
            )
            async with running(settings) as where, aiohttp.ClientSession() as client:
                async with client.post(f"{where.url}/admin/refresh") as resp:
                    resp.raise_for_status()
                for method, path in CALLS:
                    body = {"name": "Acme"} if method == "POST" else None
                    async with client.request(method, where.url + path, json=body) as resp:
                        await resp.read()
                await asyncio.to_thread(shoot, f"{where.url}/admin/", out, Path(tmp) / "profile")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = parser.parse_args()
    try:
        asyncio.run(main(args.out))
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    except KeyboardInterrupt:
        sys.exit(130)
