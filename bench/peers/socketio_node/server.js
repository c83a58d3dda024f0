// Peer server for bench/peers: a minimal, idiomatic Socket.IO 4.8 chat-room server.
//
// JWT (HS256, BENCH_JWT_SECRET) checked at connect from the handshake's auth
// payload; a bad or missing token is refused with a connect error. Events:
//   "join" {room}                 -> joins the room, acks {ok: true}
//   "send" {room, content, metadata} -> broadcasts "message" to the room's
//       other members (socket.to(room).emit: Switchboard does not echo a
//       sender's own message either), then acks {ok: true, id}
// Nothing is persisted. WebSocket transport only. Port and stdin commands:
// ../control.js.
"use strict";

const http = require("http");
const { serve } = require("../control.js");
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

serve(httpServer);
