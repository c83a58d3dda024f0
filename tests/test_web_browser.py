"""The web app in a real browser: Debian's Chromium driven by Playwright.

Two browser contexts sign in as two users (one at phone width), join a room,
see each other's presence and typing, exchange, react to, edit and delete
messages; markup in a message stays text; both pages survive a gateway
restart and recover, exactly once, a message sent while they were away; a
page in 20 rooms comes back with one request. A mention lights the other
user's bell; an admin watches live figures, kicks a user and sees the kick
in the live log page. Screenshots of the main views go
to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
from tornado.httpclient import AsyncHTTPClient

from switchboard_client import Client
from tests.support.services import require_binary
from tests.web.gateway import REPO_ROOT, GatewayProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
XSS = "<img src=x onerror=alert(1)>"
WAIT_MS = 10_000

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    # metrics:update every second, so the admin page's figures move quickly.
    with GatewayProcess(tmp_path, SWITCHBOARD_METRICS_INTERVAL="1") as gw:
        yield gw


@pytest.fixture
def browser() -> Iterator[Any]:
    require_binary(CHROMIUM, "Chromium (/usr/bin/chromium) is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(
    browser: Any, base: str, dialogs: list[str], *, sockets: list[str] | None = None,
    **context: Any,
) -> Any:
    """A page on ``base``; dialogs and (when given) WebSocket URLs are recorded."""
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(WAIT_MS)
    if sockets is not None:
        page.on("websocket", lambda ws: sockets.append(ws.url))

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.goto(base + "/")
    return page


def sign_in(page: Any, user: str, name: str, role: str = "user") -> None:
    page.fill("#signin-user", user)
    page.fill("#signin-name", name)
    page.select_option("#signin-role", role)
    page.click("#signin-dev")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
    expect(page.locator("#me")).to_have_text(name)


def post_message(base: str, user: str, room_id: str, text: str) -> None:
    """``user`` joins ``room_id`` and sends ``text`` with the Python client."""
    post_messages(base, user, [(room_id, text)])


def post_messages(base: str, user: str, messages: list[tuple[str, str]]) -> None:
    """``user`` joins each message's room and sends it, in order, with the Python client.

    Run in a thread of its own: Playwright's sync API owns this thread's loop.
    """

    async def send() -> None:
        token_body = orjson.dumps({"userId": user, "name": user})
        resp = await AsyncHTTPClient().fetch(base + "/dev/token", method="POST", body=token_body)
        token = orjson.loads(resp.body)["token"]
        ws = base.replace("http://", "ws://") + "/ws/chat"
        async with Client(ws, token) as client:
            for room_id in dict.fromkeys(room for room, _ in messages):
                await client.emit("room:join", {"roomId": room_id})
            for room_id, text in messages:
                await client.emit("message:send", {"roomId": room_id, "content": text})

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, send()).result(timeout=30)


def message(page: Any, text: str) -> Any:
    return page.locator("#messages li.message", has=page.locator(".content", has_text=text))


def test_two_users_chat_in_the_browser(gateway: GatewayProcess, browser: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []
    sockets: list[str] = []
    alice = open_page(
        browser, gateway.http, dialogs, sockets=sockets, viewport={"width": 1280, "height": 800}
    )
    alice.screenshot(path=str(ARTIFACTS / "web-signin.png"))
    sign_in(alice, "alice", "Alice")
    alice.click("text=Create a room")
    alice.fill("#new-room-name", "Lobby")
    alice.click("#create-room")
    expect(alice.locator("#room-title")).to_have_text("Lobby")
    room_id = alice.locator("#room-id").inner_text()
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", room_id)

    # Bob on a phone-width screen: the room list is a drawer.
    bob = open_page(
        browser, gateway.http, dialogs, sockets=sockets,
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
    )  # fmt: skip
    sign_in(bob, "bob", "Bob")
    bob.click("#toggle-rooms")
    bob.click(f"#room-list li[data-room='{room_id}'] button")
    expect(bob.locator("#room-title")).to_have_text("Lobby")

    # Presence: alice's member list shows bob online.
    expect(alice.locator("#members li[data-user='bob'] .presence")).to_have_attribute(
        "data-status", "online"
    )

    # Typing, then the message itself.
    bob.locator("#composer-input").press_sequentially("hel")
    expect(alice.locator("#typing")).to_have_text("Bob is typing…")
    bob.locator("#composer-input").press_sequentially("lo alice")
    bob.press("#composer-input", "Enter")
    expect(message(alice, "hello alice")).to_have_count(1)
    expect(alice.locator("#typing")).to_have_text("")

    # Markup is text: no <img> element, no dialog.
    alice.fill("#composer-input", XSS)
    alice.click("#send")
    expect(message(bob, XSS)).to_have_count(1)
    assert message(bob, XSS).locator(".content").inner_text() == XSS
    assert bob.locator("#messages img").count() == 0
    assert alice.locator("#messages img").count() == 0

    # Reactions both ways.
    message(bob, XSS).locator("button.react[data-emoji='👍']").click()
    expect(message(alice, XSS).locator(".reaction[data-emoji='👍']")).to_have_text("👍 1")

    # Reply, edit, delete (own messages only offer edit/delete).
    assert message(alice, "hello alice").locator("button.edit").count() == 0
    message(alice, "hello alice").locator("button.reply").click()
    alice.fill("#composer-input", "hi bob")
    alice.press("#composer-input", "Enter")
    expect(message(bob, "hi bob").locator(".quote")).to_contain_text("Bob: hello alice")
    message(alice, "hi bob").locator("button.edit").click()
    alice.fill("#messages .edit-input", "hi bob (edited text)")
    alice.click("#messages .edit-form button.save")
    expect(message(bob, "hi bob (edited text)").locator(".edited")).to_have_count(1)
    bob.screenshot(path=str(ARTIFACTS / "web-chat-phone.png"))
    alice.screenshot(path=str(ARTIFACTS / "web-chat-desktop.png"))
    message(alice, "hi bob (edited text)").locator("button.delete").click()
    expect(message(bob, "hi bob (edited text)")).to_have_count(0)
    expect(bob.locator("#messages li.message.deleted .content")).to_have_text("(message deleted)")

    # A gateway restart: both pages reconnect, recover what was sent while
    # they were away, and carry on, nothing doubled. The message "meanwhile" goes
    # through a second gateway on the same database while the pages' gateway is
    # down, so it can only reach them by recovery (room:resume).
    count = alice.locator("#messages li.message").count()
    gateway.stop()
    for page in (alice, bob):
        expect(page.locator("#conn-state")).to_have_attribute(
            "data-state", re.compile("reconnecting|offline")
        )
    with GatewayProcess(gateway.home, SWITCHBOARD_NODE_ID="web-side") as side:
        post_message(side.http, "carol", room_id, "sent while you were away")
    gateway.start()
    for page in (alice, bob):
        expect(page.locator("#conn-state")).to_have_attribute("data-state", "connected")
        expect(message(page, "sent while you were away")).to_have_count(1)
    bob.fill("#composer-input", "after the restart")
    bob.press("#composer-input", "Enter")
    expect(message(alice, "after the restart")).to_have_count(1)
    assert alice.locator("#messages li.message").count() == count + 2
    seqs = alice.locator("#messages li.message").evaluate_all("els => els.map(e => e.dataset.seq)")
    assert len(seqs) == len(set(seqs))

    # The pages authenticate with an auth:connect frame: no socket URL,
    # first connection or reconnection, carries the token.
    assert len(sockets) >= 8, sockets  # chat + notifications, twice per page
    assert not [url for url in sockets if "token" in url], sockets
    assert dialogs == [], f"a dialog fired: {dialogs}"


# The page's own script: web/switchboard.js in 20 rooms, what it receives kept on window.
IN_TWENTY_ROOMS_JS = """async (rooms) => {
  const { Switchboard } = await import("/switchboard.js");
  const res = await fetch("/dev/token", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ userId: "dana" }),
  });
  const { token } = await res.json();
  const sb = new Switchboard({
    url: location.origin.replace(/^http/, "ws") + "/ws/chat", token,
    reconnect: { minDelayMs: 200, maxDelayMs: 1000 },
  });
  window.sb = sb;
  window.got = [];
  window.reconnected = [];
  sb.on("message:new", (d) => {
    window.got.push([d.message.roomId, d.message.content, !!d.recovered]);
  });
  sb.on("client:reconnected", (info) => window.reconnected.push(info.rooms));
  await sb.connect();
  for (const roomId of rooms) {
    await sb.emit("room:create", { roomId, name: roomId });
    await sb.emit("room:join", { roomId });
  }
}"""


def test_a_page_in_twenty_rooms_reconnects_with_one_request_and_loses_nothing(
    gateway: GatewayProcess, browser: Any
) -> None:
    """The browser client resumes all its rooms with one room:resume after a restart;
    the messages sent while it was away (through another node) arrive once each."""
    dialogs: list[str] = []
    sent_frames: list[list[str]] = []  # per chat socket the page opened, the events it sent

    def watch(ws: Any) -> None:
        if ws.url.endswith("/ws/chat"):
            events: list[str] = []
            sent_frames.append(events)
            ws.on("framesent", lambda payload: events.append(orjson.loads(payload)["event"]))

    page = open_page(browser, gateway.http, dialogs)
    page.on("websocket", watch)
    rooms = [f"room-{n:02d}" for n in range(20)]
    page.evaluate(IN_TWENTY_ROOMS_JS, rooms)
    assert len(sent_frames) == 1 and sent_frames[0].count("room:join") == 20

    gateway.stop()
    page.wait_for_function("() => window.sb.state === 'reconnecting'")
    away = [(room, f"{room} missed {i}") for room in rooms for i in range(2)]
    with GatewayProcess(gateway.home, SWITCHBOARD_NODE_ID="web-side") as side:
        post_messages(side.http, "carol", away)
    gateway.start()
    page.wait_for_function("() => window.reconnected.length === 1")

    # One socket more that got through (attempts while the gateway was down
    # sent nothing); on it the token frame, then one request for all 20 rooms.
    used = [events for events in sent_frames if events]
    assert len(used) == 2, sent_frames
    assert [e for e in used[1] if e != "system:ping"] == ["auth:connect", "room:resume"]
    report = page.evaluate("window.reconnected[0]")
    assert report == {room: {"rejoined": True, "recovered": True, "missed": 2} for room in rooms}
    # Every message sent while away, once, in order, as recovered.
    assert page.evaluate("window.got") == [[room, text, True] for room, text in away]
    # Live again in every room.
    post_messages(gateway.http, "carol", [(rooms[-1], "live")])
    page.wait_for_function("() => window.got.length === 41")
    assert page.evaluate("window.got.at(-1)") == [rooms[-1], "live", False]
    assert dialogs == []


def test_bell_admin_page_kick_and_live_logs(gateway: GatewayProcess, browser: Any) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []
    root = open_page(browser, gateway.http, dialogs, viewport={"width": 1280, "height": 900})
    sign_in(root, "root", "Root", role="admin")
    expect(root.locator("#nav button[data-view='admin']")).to_be_visible()
    root.click("text=Create a room")
    root.fill("#new-room-name", "Ops")
    root.click("#create-room")
    expect(root.locator("#room-title")).to_have_text("Ops")
    room_id = root.locator("#room-id").inner_text()

    bob = open_page(browser, gateway.http, dialogs, viewport={"width": 1024, "height": 768})
    sign_in(bob, "bob", "Bob")
    expect(bob.locator("#nav button[data-view='admin']")).to_be_hidden()
    bob.click("text=Join by id")
    bob.fill("#join-room-id", room_id)
    bob.click("#join-room")
    expect(bob.locator("#room-title")).to_have_text("Ops")

    # A mention shows up in bob's bell.
    root.fill("#composer-input", "@bob please look at this")
    root.press("#composer-input", "Enter")
    expect(bob.locator("#bell-count")).to_have_text("1")
    bob.click("#bell")
    entry = bob.locator("#notification-list li.notification.unread")
    expect(entry.locator(".title")).to_contain_text("mentioned you")
    expect(entry.locator(".body")).to_have_text("@bob please look at this")
    bob.screenshot(path=str(ARTIFACTS / "web-notifications.png"))
    entry.locator("button.open").click()
    expect(bob.locator("#bell-count")).to_be_hidden()

    # The live log page, subscribed before the kick happens.
    root.click("#nav button[data-view='logs']")
    expect(root.locator("#logs-view")).to_be_visible()
    root.fill("#log-contains", "kick")
    root.click("#log-apply")

    # The admin page: live figures, charts, online users; kick bob.
    root.click("#nav button[data-view='admin']")
    updates = root.locator("#admin-figures [data-figure='updates'] .value")
    expect(updates).to_have_text(re.compile(r"^[3-9]|\d\d"), timeout=15_000)
    assert int(root.locator("[data-figure='connections'] .value").inner_text()) >= 4
    points = root.locator("#chart-connections polyline").get_attribute("points") or ""
    assert len(points.split()) >= 3
    row = root.locator("#online-users tr[data-user='bob']")
    expect(row).to_be_visible()
    assert root.locator("#online-users tr[data-user='root'] button.kick").is_disabled()
    root.fill("#mod-reason", "testing the kick")
    root.screenshot(path=str(ARTIFACTS / "web-admin.png"))
    row.locator("button.kick").click()
    expect(root.locator("#admin-status")).to_have_text("Kick: bob done")
    expect(bob.locator("#conn-state")).to_have_attribute("data-state", "offline")
    expect(bob.locator("#banner")).to_have_text("You were removed by root: testing the kick.")
    expect(row).to_have_count(0)

    root.click("#nav button[data-view='logs']")
    line = root.locator("#log-list li.log", has_text="kicked bob")
    expect(line).to_have_count(1)
    expect(line.locator(".level")).to_have_text("INFO")
    root.screenshot(path=str(ARTIFACTS / "web-logs.png"))
    assert dialogs == []
