// What every Node peer server shares with the driver (bench/peers/servers.py):
// listen on PORT (0: any) on loopback and print {"port", "pid"} as one JSON
// line; then answer stdin commands, one a line: "gc" (under --expose-gc:
// collect, so idle memory is measured after it) -> {"ok": true}. End of stdin
// (the driver stops us, or died) -> exit.
"use strict";

function serve(httpServer) {
  httpServer.listen(Number(process.env.PORT || 0), "127.0.0.1", () => {
    process.stdout.write(
      JSON.stringify({ port: httpServer.address().port, pid: process.pid }) + "\n"
    );
  });
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
}

module.exports = { serve };
