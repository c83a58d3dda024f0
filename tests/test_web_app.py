"""handlers/web.py: the web app's static files and ``POST /dev/token``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from switchboard_client import Client

PRODUCTION = {
    "env": "production",
    "jwt_secret": "s" * 40,
    "allowed_origins": "https://chat.example",
}


async def fetch(url: str, **kwargs: Any) -> HTTPResponse:
    return await AsyncHTTPClient().fetch(url, raise_error=False, **kwargs)


async def post_json(url: str, body: Any) -> HTTPResponse:
    return await fetch(url, method="POST", body=json.dumps(body))


@pytest.mark.asyncio
async def test_index_is_served_at_root_with_cache_and_security_headers(gateway):
    response = await fetch(gateway.http + "/")
    assert response.code == 200
    assert b'<script type="module" src="app.js">' in response.body
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.headers["Cache-Control"] == "no-cache"
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    etag = response.headers["Etag"]
    again = await fetch(gateway.http + "/", headers={"If-None-Match": etag})
    assert again.code == 304


@pytest.mark.asyncio
async def test_scripts_and_styles_are_served_and_versioned_urls_cached_long(gateway):
    script = await fetch(gateway.http + "/switchboard.js")
    assert script.code == 200
    assert "javascript" in script.headers["Content-Type"]
    assert b"export class Switchboard" in script.body
    assert (await fetch(gateway.http + "/app.css")).headers["Content-Type"].startswith("text/css")
    versioned = await fetch(gateway.http + "/app.js?v=1")
    assert "max-age=" in versioned.headers["Cache-Control"]


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/test/helpers.js", "/package.json", "/../setup.cfg", "/nope.js"])
async def test_only_top_level_app_files_are_served(gateway, path):
    assert (await fetch(gateway.http + path)).code == 404


@pytest.mark.asyncio
async def test_routes_before_the_web_app_still_answer(gateway):
    assert (await fetch(gateway.http + "/health")).code == 200


@pytest.mark.asyncio
async def test_dev_token_in_development_signs_a_usable_token(gateway_factory):
    gw = await gateway_factory(env="development")
    response = await post_json(
        gw.http + "/dev/token",
        {"userId": "dora", "displayName": "Dora", "roles": ["user", "admin"]},
    )
    assert response.code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = json.loads(response.body)
    assert body["userId"] == "dora"
    async with Client(gw.url(), body["token"]) as client:
        assert client.welcome is not None
        user = client.welcome["user"]
    assert (user["userId"], user["displayName"]) == ("dora", "Dora")
    assert sorted(user["roles"]) == ["admin", "user"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "userId"),
        ({"userId": "a b"}, "userId"),
        ({"userId": "x", "roles": ["root"]}, "roles"),
        ({"userId": "x", "roles": []}, "roles"),
        ({"userId": "x", "roles": [["admin"]]}, "roles"),
        ({"userId": "x", "roles": [{"admin": True}]}, "roles"),
        ({"userId": "x", "ttl": 0}, "ttl"),
        ({"userId": "x", "name": ""}, "name"),
    ],
)
async def test_dev_token_validates(gateway_factory, body, field):
    gw = await gateway_factory(env="development")
    response = await post_json(gw.http + "/dev/token", body)
    assert response.code == 400
    error = json.loads(response.body)["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert field in error["details"]


@pytest.mark.asyncio
async def test_dev_token_rejects_a_non_json_body(gateway_factory):
    gw = await gateway_factory(env="development")
    response = await fetch(gw.http + "/dev/token", method="POST", body="{nope")
    assert response.code == 400
    assert json.loads(response.body)["error"]["code"] == "BAD_REQUEST"


@pytest.mark.asyncio
@pytest.mark.parametrize("overrides", [{}, PRODUCTION], ids=["test", "production"])
async def test_dev_token_does_not_exist_outside_development(gateway_factory, overrides):
    gw = await gateway_factory(**overrides)
    response = await post_json(gw.http + "/dev/token", {"userId": "mallory", "roles": ["admin"]})
    assert response.code == 404
    assert json.loads(response.body)["error"]["code"] == "NOT_FOUND"
    assert b"token" not in response.body
