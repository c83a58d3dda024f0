// Ceiling reference for bench/peers: Node `ws` with each broadcast framed once.
//
// Speaks Switchboard's JSON envelope (so the driver's Switchboard client drives
// it unchanged): the JWT (HS256, BENCH_JWT_SECRET) in the upgrade's
// `Authorization: Bearer` header (a bad one: 401, no upgrade), then
// {"event":"system:welcome"}; "room:join" {roomId} -> ack; "message:send"
// {roomId, content, metadata} -> "message:new" to the room's other members,
// then the ack. The broadcast's JSON and WebSocket frame are built once and
// the same bytes written to every member's socket. Nothing is persisted.
// Uses the packages of ../socketio_node (its package.json lists `ws`).
// Port and stdin commands: ../control.js.
"use strict";

const http = require("http");
const { serve } = require("../control.js");
const path = require("path");
const modules = path.join(__dirname, "..", "socketio_node", "node_modules");
const jwt = require(path.join(modules, "jsonwebtoken"));
const WebSocket = require(path.join(modules, "ws"));

const SECRET = process.env.BENCH_JWT_SECRET;
if (!SECRET) throw new Error("BENCH_JWT_SECRET is not set");

const rooms = new Map(); // room -> Set of ws
const wss = new WebSocket.Server({ noServer: true, perMessageDeflate: false });
const httpServer = http.createServer();
let nextId = 0;

httpServer.on("upgrade", (req, socket, head) => {
  const auth = req.headers.authorization || "";
  jwt.verify(auth.replace(/^Bearer /, ""), SECRET, { algorithms: ["HS256"] }, (err, claims) => {
    if (err) {
      socket.end("HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      ws.user = claims.sub;
      ws.rooms = new Set();
      ws.send(JSON.stringify({ event: "system:welcome", data: { userId: claims.sub } }));
      ws.on("message", (raw) => onMessage(ws, raw));
      ws.on("close", () => {
        for (const room of ws.rooms) rooms.get(room).delete(ws);
      });
    });
  });
});

function onMessage(ws, raw) {
  const msg = JSON.parse(raw);
  const data = msg.data || {};
  if (msg.event === "room:join") {
    let members = rooms.get(data.roomId);
    if (!members) rooms.set(data.roomId, (members = new Set()));
    members.add(ws);
    ws.rooms.add(data.roomId);
    ws.send(JSON.stringify({ ack: msg.ack, ok: true }));
  } else if (msg.event === "message:send") {
    const id = ++nextId;
    const payload = Buffer.from(JSON.stringify({
      event: "message:new",
      data: { id, roomId: data.roomId, sender: ws.user, createdAt: new Date().toISOString(),
              content: data.content, metadata: data.metadata },
    }));
    // One frame for every member: WebSocket.Sender.frame is ws's public framing
    // helper; writing the bytes to the member's socket (ws._socket, ws's own
    // field: there is no public "send pre-framed bytes") skips per-member framing.
    const frame = Buffer.concat(WebSocket.Sender.frame(payload, {
      fin: true, opcode: 1, mask: false, readOnly: true, rsv1: false,
    }));
    for (const member of rooms.get(data.roomId) || []) {
      if (member !== ws && member.readyState === WebSocket.OPEN) member._socket.write(frame);
    }
    ws.send(JSON.stringify({ ack: msg.ack, ok: true, data: { id } }));
  } else if (msg.ack !== undefined) {
    ws.send(JSON.stringify({ ack: msg.ack, ok: false, error: { code: "UNKNOWN_EVENT" } }));
  }
}

serve(httpServer);
