"""/admin/: one server-rendered page, a function of the status document and recent requests.

No external assets, no build step, readable without JavaScript: a meta refresh reloads it,
and one small inline script (allowed by its hash in the page's CSP) counts the token's
expiry down between reloads. Buttons are plain forms that post to /admin/refresh and
/admin/revoke with a per-page token; nothing on the page is a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from datetime import UTC, datetime
from html import escape
from typing import Any, Final, NamedTuple

RECENT_SIZE: Final = 100
RELOAD_SECONDS: Final = 5
PAGE_TOKEN_FIELD: Final = "page_token"  # noqa: S105 - a form field name
# A token stays valid this long, and only so many are kept (the page reloads itself).
PAGE_TOKEN_LIFETIME: Final = 3600.0
PAGE_TOKENS_KEPT: Final = 1024
_PATH_SHOWN: Final = 200


class RecentRequest(NamedTuple):
    """One proxied request as the table shows it: the path without its query."""

    at: float
    method: str
    path: str
    status: int
    duration: float
    waited: float = 0.0
    key: str | None = None


class Recent:
    """The last RECENT_SIZE proxied requests, newest last."""

    def __init__(self, size: int = RECENT_SIZE) -> None:
        self._items: deque[RecentRequest] = deque(maxlen=size)

    def add(self, item: RecentRequest) -> None:
        self._items.append(item)

    def newest_first(self) -> list[RecentRequest]:
        return list(reversed(self._items))


class PageTokens:
    """Single-process tokens that prove a browser POST came from a page this proxy served."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._issued: OrderedDict[str, float] = OrderedDict()

    def issue(self) -> str:
        token = secrets.token_urlsafe(24)
        self._issued[token] = self._clock() + PAGE_TOKEN_LIFETIME
        while len(self._issued) > PAGE_TOKENS_KEPT:
            self._issued.popitem(last=False)
        return token

    def valid(self, presented: str | None) -> bool:
        if not presented:
            return False
        now = self._clock()
        for token, expires in list(self._issued.items()):
            if expires < now:
                del self._issued[token]
        # compare_digest on every candidate: no timing hint about which prefix matched.
        return any(hmac.compare_digest(presented, token) for token in self._issued)


# Counts the expiry down between reloads; the page reads the same without it.
_SCRIPT: Final = (
    "(function(){var s=Date.now();function t(){document.querySelectorAll('[data-expires-in]')"
    ".forEach(function(e){var n=Math.floor(+e.dataset.expiresIn-(Date.now()-s)/1000);"
    "e.textContent=n>0?(n>=3600?Math.floor(n/3600)+'h ':'')+Math.floor(n%3600/60)+'m '"
    "+(n%60)+'s':'expired';});}t();setInterval(t,1000);})();"
)
_SCRIPT_HASH: Final = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
PAGE_HEADERS: dict[str, str] = {
    "Cache-Control": "no-store",
    # Not no-referrer: with it Chromium sends `Origin: null` on the buttons' posts.
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}

_STYLE: Final = """
:root{--fg:#1d232b;--mute:#5c6773;--line:#dfe3e8;--bg:#f6f7f9;--ok:#1f7a3f;--warn:#9a6700;
--bad:#b42318}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
main{max-width:72em;margin:0 auto;padding:1.2em}
header{display:flex;align-items:baseline;gap:1em;flex-wrap:wrap}
h1{font-size:1.25em;margin:0}
h2{font-size:1em;margin:1.6em 0 .5em;color:var(--mute);text-transform:uppercase;
letter-spacing:.06em}
.banner{margin:1em 0;padding:.8em 1em;border-radius:6px;color:#fff;font-weight:600}
.banner.ok{background:var(--ok)}.banner.warn{background:var(--warn)}
.banner.bad{background:var(--bad)}
.banner small{display:block;font-weight:400;opacity:.95}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(12em,1fr));gap:.8em}
.card{background:#fff;border:1px solid var(--line);border-radius:6px;padding:.7em .9em}
.card b{display:block;font-size:.8em;color:var(--mute);font-weight:500}
.card span{font-size:1.15em;font-variant-numeric:tabular-nums;word-break:break-all}
table{width:100%;border-collapse:collapse;background:#fff;border:1px solid var(--line)}
th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid var(--line);
font-variant-numeric:tabular-nums;white-space:nowrap}
th{font-size:.8em;color:var(--mute);font-weight:600;background:#fafbfc}
td.path{white-space:normal;word-break:break-all;font-family:ui-monospace,monospace;
font-size:.9em}
td.num,th.num{text-align:right}
.s2{color:var(--ok)}.s3{color:var(--mute)}.s4{color:var(--warn)}.s5{color:var(--bad)}
form{display:inline}
button{font:inherit;padding:.35em 1em;border-radius:5px;border:1px solid #9aa4ae;
background:#fff;cursor:pointer}
button.danger{border-color:var(--bad);color:var(--bad)}
.actions{display:flex;gap:.6em;margin:.6em 0}
.notice{padding:.5em .8em;background:#fff;border-left:4px solid var(--mute)}
.empty{color:var(--mute);font-style:italic}
footer{margin-top:2em;color:var(--mute);font-size:.85em}
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _duration(seconds: float | int | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds <= 0:
        return "expired"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h " if hours else "") + f"{minutes}m {secs}s"


def _when(iso: object) -> str:
    """An ISO UTC timestamp from the document, as people read it."""
    if not isinstance(iso, str) or not iso:
        return "—"
    return iso.replace("T", " ").removesuffix("+00:00")


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S")


def _banner(doc: dict[str, Any]) -> tuple[str, str, str]:
    """(css class, headline, detail) for the state at the top of the page."""
    problem = doc.get("problem")
    failing = doc.get("last_refresh_error")
    if not doc.get("logged_in"):
        return "bad", "Not logged in", str(problem or "run `closeproxy login`")
    if failing:
        return "warn", "Logged in, but refreshing fails", str(failing)
    if not doc.get("access_token_valid", True):
        return "warn", "Logged in, but the access token has expired", str(problem or "")
    if problem:
        return "warn", "Logged in", str(problem)
    return "ok", "Logged in to Close", ""


def _card(title: str, value: str, **attrs: str) -> str:
    extra = "".join(f' {name.replace("_", "-")}="{_e(v)}"' for name, v in attrs.items())
    return f'<div class="card"><b>{_e(title)}</b><span{extra}>{value}</span></div>'


def _counters(doc: dict[str, Any]) -> str:
    counters: dict[str, Any] = doc.get("counters") or {}
    if not counters:
        return '<p class="empty">nothing counted yet</p>'
    cells = "".join(
        _card(name.replace("_", " "), _e(value)) for name, value in sorted(counters.items())
    )
    return f'<div class="cards">{cells}</div>'


def _resets_in(info: dict[str, Any]) -> str:
    """Seconds until the group's reset (status documents carry `reset_at`, Unix time)."""
    reset_at = info.get("reset_at")
    if isinstance(reset_at, int | float):
        return f"{max(reset_at - time.time(), 0):.1f}"
    value = info.get("reset", info.get("reset_in"))
    return "—" if value is None else str(value)


def _rate_limits(doc: dict[str, Any]) -> str:
    groups = doc.get("rate_limits")
    if not groups:
        return '<p class="empty">no rate-limit information from Close yet</p>'
    rows = []
    items = groups.items() if isinstance(groups, dict) else enumerate(groups)
    for name, group in items:
        info = group if isinstance(group, dict) else {"remaining": group}
        label = info.get("group", name)
        rows.append(
            f"<tr><td>{_e(label)}</td><td class=num>{_e(info.get('remaining', '—'))}</td>"
            f"<td class=num>{_e(info.get('limit', '—'))}</td>"
            f"<td class=num>{_e(_resets_in(info))}</td>"
            f"<td class=num>{_e(info.get('waits', '—'))}</td></tr>"
        )
    return (
        "<table><thead><tr><th>group</th><th class=num>remaining</th><th class=num>limit</th>"
        "<th class=num>resets in (s)</th><th class=num>waits</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _recent(recent: list[RecentRequest]) -> str:
    if not recent:
        return '<p class="empty">no request through the proxy yet</p>'
    rows = []
    for item in recent:
        path = item.path if len(item.path) <= _PATH_SHOWN else item.path[:_PATH_SHOWN] + "…"
        rows.append(
            f"<tr><td>{_clock(item.at)}</td><td>{_e(item.method)}</td>"
            f'<td class="path">{_e(path)}</td>'
            f'<td class="num s{item.status // 100}">{item.status}</td>'
            f"<td class=num>{item.duration * 1000:.1f}</td>"
            f"<td class=num>{item.waited * 1000:.0f}</td>"
            f"<td>{_e(item.key or '—')}</td></tr>"
        )
    return (
        '<table id="recent"><thead><tr><th>time (UTC)</th><th>method</th><th>path</th>'
        "<th class=num>status</th><th class=num>ms</th><th class=num>waited ms</th>"
        "<th>key</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def render(
    doc: dict[str, Any],
    recent: list[RecentRequest],
    *,
    page_token: str,
    notice: str | None = None,
    metrics: bool = True,
) -> str:
    """The whole page; every value from the document is escaped, none is a secret."""
    kind, headline, detail = _banner(doc)
    hidden = f'<input type="hidden" name="{PAGE_TOKEN_FIELD}" value="{_e(page_token)}">'
    expires_in = doc.get("expires_in")
    cards = [
        _card("organization", _e(doc.get("organization_id") or "—"), id="org"),
        _card("user", _e(doc.get("user_id") or "—"), id="user"),
        _card(
            "access token expires in",
            _e(_duration(expires_in)),
            id="expires-in",
            **({"data_expires_in": str(int(expires_in))} if expires_in is not None else {}),
        ),
        _card("expires at (UTC)", _e(_when(doc.get("expires_at"))), id="expires-at"),
        _card("last refresh (UTC)", _e(_when(doc.get("last_refresh"))), id="last-refresh"),
        _card("scope", _e(doc.get("scope") or "—")),
    ]
    notice_html = f'<p class="notice" id="notice">{_e(notice)}</p>' if notice else ""
    metrics_link = ' · <a href="/metrics">metrics</a>' if metrics else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{RELOAD_SECONDS}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>closeproxy dashboard</title><style>{_STYLE}</style></head>
<body><main>
<header><h1>closeproxy</h1><span>forwarding to {_e(doc.get("api_url") or "Close")}</span>
</header>
<div class="banner {kind}" id="banner">{_e(headline)}<small>{_e(detail)}</small></div>
{notice_html}
<div class="actions">
<form method="post" action="/admin/refresh">{hidden}<button type="submit" id="refresh">Refresh
token now</button></form>
<form method="post" action="/admin/revoke">{hidden}<button type="submit" class="danger"
id="revoke">Revoke and log out</button></form>
</div>
<div class="cards">{"".join(cards)}</div>
<h2>Counters</h2>{_counters(doc)}
<h2>Rate-limit headroom</h2>{_rate_limits(doc)}
<h2>Last {RECENT_SIZE} requests</h2>{_recent(recent)}
<footer>closeproxy {_e(doc.get("version", ""))} · up {_e(_duration(doc.get("uptime")))}
· token file {_e(doc.get("token_file", ""))} · reloads every {RELOAD_SECONDS} s ·
<a href="/admin/status">status JSON</a>{metrics_link}</footer>
</main><script>{_SCRIPT}</script></body></html>
"""
