// Peer server for bench/peers: a minimal, idiomatic Socket.IO 4.8 chat-room server.
//
// JWT (HS256, BENCH_JWT_SECRET) checked at connect from the handshake's auth
// payload; a bad or missing token is refused with a connect error. Events:
//   "join" {room}                 -> joins the room, acks {ok: true}
//   "send" {room, content, metadata} -> broadcasts "message" to the room's
//       other members (socket.to(room).emit: Switchboard does not echo a
//       sender's own message either), then acks {ok: true, id}
// Nothing is persisted. WebSocket transport only. Listens on PORT (0: any)
// and prints {"port", "pid"} as one JSON line; stdin commands below.
"use strict";

const http = require("http");
const jwt = require("jsonwebtoken");
const { Server } = require("socket.io");

const SECRET = process.env.BENCH_JWT_SECRET;
if (!SECRET) throw new Error("BENCH_JWT_SECRET is not set");

const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
});

io.use((socket, next) => {
  const token = socket.handshake.auth && socket.handshake.auth.token;
  jwt.verify(token || "", SECRET, { algorithms: ["HS256"] }, (err, claims) => {
    if (err) return next(new Error("unauthorized"));
    socket.data.user = claims.sub;
    next();
  });
});

let nextId = 0;

io.on("connection", (socket) => {
  socket.on("join", (data, ack) => {
    socket.join(data.room);
    if (typeof ack === "function") ack({ ok: true });
  });
  socket.on("send", (data, ack) => {
    const id = ++nextId;
    socket.to(data.room).emit("message", {
      id,
      room: data.room,
      sender: socket.data.user,
      createdAt: new Date().toISOString(),
      content: data.content,
      metadata: data.metadata,
    });
    if (typeof ack === "function") ack({ ok: true, id });
  });
});

httpServer.listen(Number(process.env.PORT || 0), "127.0.0.1", () => {
  process.stdout.write(
    JSON.stringify({ port: httpServer.address().port, pid: process.pid }) + "\n"
  );
});

// Commands on stdin, one a line: "gc" (with --expose-gc: collect, so idle
// memory is measured after it) -> {"ok": true}. End of stdin (the driver stops
// us, or died) -> exit.
let pending = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  pending += chunk;
  let nl;
  while ((nl = pending.indexOf("\n")) >= 0) {
    const line = pending.slice(0, nl).trim();
    pending = pending.slice(nl + 1);
    if (line === "gc" && global.gc) global.gc();
    process.stdout.write(JSON.stringify({ ok: true }) + "\n");
  }
});
process.stdin.on("end", () => process.exit(0));
process.stdin.on("error", () => process.exit(0));
