"""Close's /oauth2/ endpoints: authorize page, token endpoint, revoke endpoint."""

from __future__ import annotations

import asyncio
import html
import re
import urllib.parse
from collections.abc import Mapping

from aiohttp import web
from multidict import MultiDict, MultiMapping
from yarl import URL

from closeproxy.sim.state import SIM_STATE, OAuthError, SimState

FORM_TYPE: str = "application/x-www-form-urlencoded"
# RFC 7636: an S256 challenge is base64url(sha256(...)) without padding, 43 characters.
S256_CHALLENGE: re.Pattern[str] = re.compile(r"[A-Za-z0-9_-]{43}")
CONSENT_FIELDS: tuple[str, ...] = (
    "client_id",
    "response_type",
    "redirect_uri",
    "state",
    "code_challenge",
    "code_challenge_method",
)


class _Duplicate(Exception):
    """A parameter appeared more than once (RFC 6749 3.1: must not)."""


def _single(params: MultiMapping[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in params.items():
        if name in values:
            raise _Duplicate(name)
        values[name] = value
    return values


def _html_page(title: str, body: str, *, status: int = 200) -> web.Response:
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body>{body}</body></html>"
    )
    return web.Response(text=page, status=status, content_type="text/html")


def _error_page(message: str) -> web.Response:
    return _html_page("Authorization error", f"<h1>{html.escape(message)}</h1>", status=400)


def _redirect_target(uri: str) -> bool:
    try:
        url = URL(uri)
    except ValueError:
        return False
    return url.scheme in {"http", "https"} and bool(url.host) and not url.raw_fragment


def _redirect(uri: str, params: Mapping[str, str]) -> web.Response:
    # Appended by hand so an existing query on the registered URI stays byte for byte.
    separator = "&" if "?" in uri else "?"
    if uri.endswith(("?", "&")):
        separator = ""
    location = uri + separator + urllib.parse.urlencode(params)
    return web.Response(status=302, headers={"Location": location})


def _consent_page(params: Mapping[str, str]) -> web.Response:
    hidden = "".join(
        f"<input type='hidden' name='{name}' value='{html.escape(params[name], quote=True)}'>"
        for name in CONSENT_FIELDS
        if name in params
    )
    body = (
        "<h1>Simulated Org</h1><p>An application asks for full access to your Close data.</p>"
        f"<form method='post' action='/oauth2/authorize/'>{hidden}"
        "<button type='submit' name='decision' value='allow'>Allow</button>"
        "<button type='submit' name='decision' value='deny'>Deny</button></form>"
    )
    return _html_page("Authorize application", body)


def _authorize(state: SimState, params: Mapping[str, str], decision: str | None) -> web.Response:
    config = state.config
    if params.get("client_id") != config.client_id:
        return _error_page("Unknown client_id.")
    redirect_uri = params.get("redirect_uri")
    target = redirect_uri if redirect_uri is not None else config.default_redirect_uri
    if not _redirect_target(target):
        return _error_page("Invalid redirect_uri.")

    reply: dict[str, str] = {}
    challenge = params.get("code_challenge")
    method = params.get("code_challenge_method")
    if params.get("response_type") != "code":
        reply["error"] = "unsupported_response_type"
    elif method is not None and challenge is None:
        reply["error"] = "invalid_request"
        reply["error_description"] = "code_challenge_method without code_challenge."
    elif challenge is not None and method != "S256":
        # Absent means "plain" (RFC 7636 4.3), which Close does not advertise.
        reply["error"] = "invalid_request"
        reply["error_description"] = "Only code_challenge_method=S256 is supported."
    elif challenge is not None and not S256_CHALLENGE.fullmatch(challenge):
        reply["error"] = "invalid_request"
        reply["error_description"] = "Malformed code_challenge."
    elif decision is None and not config.auto_consent:
        return _consent_page(params)
    elif decision == "deny" or (decision is None and state.deny):
        reply["error"] = "access_denied"
    elif decision not in {None, "allow"}:
        return _error_page("Unknown decision.")
    else:
        reply["code"] = state.create_code(config.client_id, redirect_uri, challenge)
    if "state" in params:
        reply["state"] = params["state"]
    return _redirect(target, reply)


async def authorize_get(request: web.Request) -> web.Response:
    try:
        params = _single(request.query)
    except _Duplicate as dup:
        return _error_page(f"Parameter {dup} given more than once.")
    return _authorize(request.app[SIM_STATE], params, None)


async def authorize_post(request: web.Request) -> web.Response:
    """The consent form's submission: the original parameters plus the user's decision."""
    form = await request.post()
    try:
        params = _single(MultiDict((k, v) for k, v in form.items() if isinstance(v, str)))
    except _Duplicate as dup:
        return _error_page(f"Parameter {dup} given more than once.")
    decision = params.pop("decision", "")
    return _authorize(request.app[SIM_STATE], params, decision)


def _oauth_error(exc: OAuthError) -> web.Response:
    return web.json_response(
        {"error": exc.error, "error_description": exc.description}, status=exc.status
    )


async def _read_form(request: web.Request) -> dict[str, str]:
    """Parse a form-encoded body strictly; OAuthError('invalid_request') otherwise."""
    body = await request.read()
    if request.content_type != FORM_TYPE:
        raise OAuthError("invalid_request", f"Expected a {FORM_TYPE} body.")
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, errors="strict"
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError("invalid_request", "Malformed form body.") from exc
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", f"Parameter {name} given more than once.")
        form[name] = value
    return form


async def _lose_connection(request: web.Request) -> web.Response:
    # Closing the transport before the handler returns means aiohttp never writes
    # the reply: the client sees the connection drop with no response at all.
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=503)


async def _endpoint_gate(request: web.Request, state: SimState) -> web.Response | None:
    """Apply the token_endpoint/token_delay knobs; a response means: answer with it."""
    if state.token_delay > 0:
        await asyncio.sleep(state.token_delay)
    if state.token_stall > 0:
        await asyncio.sleep(state.token_stall)
        if request.transport is None or request.transport.is_closing():
            state.token_requests_abandoned += 1
            return web.Response(status=499)  # never written: nobody is there to read it
    mode = state.token_endpoint
    if mode == "down":
        return web.json_response(
            {"error": "temporarily_unavailable", "error_description": "Simulated outage."},
            status=503,
        )
    if mode == "drop":
        return await _lose_connection(request)
    return None


async def token(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    peer = request.transport.get_extra_info("peername") if request.transport else None
    port = int(peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else 0
    state.token_requests_in_flight.append(port)
    try:
        return await _token(request, state, port)
    finally:
        state.token_requests_in_flight.remove(port)


async def _token(request: web.Request, state: SimState, port: int) -> web.Response:
    state.token_requests += 1
    state.log_oauth_headers(request)
    try:
        form = await _read_form(request)
    except OAuthError as exc:
        state.log_token({})
        return _oauth_error(exc)
    state.log_token(dict(form))
    # Validation and rotation run after the delay, with no await in between, so
    # the delay widens the "request in flight" window without breaking atomicity.
    refused = await _endpoint_gate(request, state)
    if refused is not None:
        return refused
    try:
        response = web.json_response(
            _grant(state, form, port), headers={"Cache-Control": "no-store", "Pragma": "no-cache"}
        )
    except OAuthError as exc:
        response = _oauth_error(exc)
    mode = state.token_endpoint
    if mode == "lose_reply":
        return await _lose_connection(request)
    return response


def _grant(state: SimState, form: Mapping[str, str], port: int) -> dict[str, object]:
    client_id = form.get("client_id")
    if not state.client_ok(client_id, form.get("client_secret")):
        raise OAuthError("invalid_client", "Invalid client credentials.", status=401)
    assert client_id is not None  # client_ok rejects None
    grant_type = form.get("grant_type")
    if grant_type == "authorization_code":
        code = form.get("code")
        if not code:
            raise OAuthError("invalid_request", "Missing code.")
        return state.exchange_code(
            client_id=client_id,
            code=code,
            redirect_uri=form.get("redirect_uri"),
            code_verifier=form.get("code_verifier"),
        )
    if grant_type == "refresh_token":
        refresh_token = form.get("refresh_token")
        if not refresh_token:
            raise OAuthError("invalid_request", "Missing refresh_token.")
        return state.refresh(refresh_token, port=port)
    if grant_type is None:
        raise OAuthError("invalid_request", "Missing grant_type.")
    raise OAuthError("unsupported_grant_type", f"Unsupported grant_type {grant_type!r}.")


async def revoke(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    try:
        form = await _read_form(request)
    except OAuthError as exc:
        state.log_revoke({})
        return _oauth_error(exc)
    state.log_revoke(dict(form))
    state.log_oauth_headers(request)
    if state.revoke_delay > 0:
        await asyncio.sleep(state.revoke_delay)
    if state.revoke_down:
        return web.json_response(
            {"error": "temporarily_unavailable", "error_description": "Simulated outage."},
            status=503,
        )
    refused = await _endpoint_gate(request, state)
    if refused is not None:
        return refused
    response = _revoke(state, form)
    mode = state.token_endpoint
    if mode == "lose_reply":
        return await _lose_connection(request)
    return response


def _revoke(state: SimState, form: Mapping[str, str]) -> web.Response:
    if not state.client_ok(form.get("client_id"), form.get("client_secret")):
        return _oauth_error(OAuthError("invalid_client", "Invalid client credentials.", status=401))
    token_value = form.get("token")
    if not token_value:
        return _oauth_error(OAuthError("invalid_request", "Missing token."))
    state.revokes += 1
    state.revoke(token_value)
    return web.json_response({})
