// The microte dashboard: a read-only observer of the market server it is served by.
// It speaks socket.io (protocol 5 over engine.io 4) on a bare WebSocket, so the page needs
// no library and no network beyond this server. Packets used (docs/dashboard.md):
//   server "0{...}" open, "2" ping (we answer "3"); we send "40/observe,{id,token}" (login)
//   server "40/observe,{sid}" logged in, "44/observe,{message}" refused,
//   "42/observe,["snapshot",{...}]" an update; we send "42/observe,N["snapshot",{}]" and
//   hear "43/observe,N[reply]".
"use strict";

const NSP = "/observe";

class Observer {
  constructor(auth, on) {
    this.auth = auth;
    this.on = on; // {connected, refused, closed, snapshot}
    this.acks = new Map();
    this.nextId = 1;
    const proto = location.protocol === "https:" ? "wss" : "ws";
    this.ws = new WebSocket(`${proto}://${location.host}/socket.io/?EIO=4&transport=websocket`);
    this.ws.onmessage = (m) => this.engine(String(m.data));
    this.ws.onclose = () => this.on.closed();
  }

  engine(data) {
    const type = data[0];
    if (type === "0") this.ws.send("40" + NSP + "," + JSON.stringify(this.auth));
    else if (type === "2") this.ws.send("3");
    else if (type === "4") this.socketio(data.slice(1));
  }

  socketio(p) {
    const type = p[0];
    let rest = p.slice(1);
    if (rest[0] === "/") {
      const comma = rest.indexOf(",");
      if (rest.slice(0, comma) !== NSP) return;
      rest = rest.slice(comma + 1);
    }
    const id = rest.match(/^\d+/);
    if (id) rest = rest.slice(id[0].length);
    const payload = rest ? JSON.parse(rest) : null;
    if (type === "0") this.on.connected();
    else if (type === "4") this.on.refused(payload && payload.message);
    else if (type === "1") this.ws.close();
    else if (type === "2" && payload[0] === "snapshot") this.on.snapshot(payload[1]);
    else if (type === "3" && id) {
      const cb = this.acks.get(Number(id[0]));
      this.acks.delete(Number(id[0]));
      if (cb) cb(payload[0]);
    }
  }

  emit(event, data, cb) {
    const id = this.nextId++;
    this.acks.set(id, cb);
    this.ws.send("42" + NSP + "," + id + JSON.stringify([event, data]));
  }
}

const $ = (id) => document.getElementById(id);
const text = (id, value) => { $(id).textContent = value; };
const fmtTime = (t) => (t === null || t === undefined) ? "-"
  : new Date(t * 1000).toISOString().replace("T", " ").replace(/:00\.000Z$/, " UTC").replace(/\.000Z$/, " UTC");
const fmtNum = (x) => (x === null || x === undefined) ? "-" : String(x);

let countdown = null; // {closesIn, at}: the server's countdown when the snapshot arrived

function status(label, cls) {
  const s = $("status");
  s.textContent = label;
  s.className = "tag " + (cls || "");
}

function rows(tbody, items, cells) {
  tbody.replaceChildren(...items.map((item) => {
    const tr = document.createElement("tr");
    for (const [value, cls] of cells(item)) {
      const td = document.createElement("td");
      td.textContent = value;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function render(s) {
  text("mode", s.mode);
  const r = s.round;
  text("round-time", r ? fmtTime(r.time) : "no round yet");
  $("round-time").dataset.time = r ? r.time : "";
  countdown = r && r.closes_in !== null ? { closesIn: r.closes_in, at: Date.now() } : null;
  tick();
  text("rounds-processed", s.rounds_processed);

  const c = s.last_clearing;
  const priced = s.rounds.filter((r) => r.price_buy !== null).pop();
  text("last-price", priced ? fmtNum(priced.price_buy) : "-");
  text("last-price-slot", priced ? fmtTime(priced.slot) : "-");
  text("last-volume", c ? c.volume_wh : "-");
  text("last-fills", c ? c.fills : "-");
  text("last-slot", c ? fmtTime(c.slot) : "-");

  const p = s.participants;
  text("online", p.online);
  text("registered", p.registered);
  text("offline", p.offline ? `${p.offline} (${p.offline_ids.join(", ")}${p.offline > p.offline_ids.length ? ", ..." : ""})` : "none");
  const m = s.last_processed;
  text("missing", m ? (m.missing ? `${m.missing} (${m.missing_ids.join(", ")})` : "none") : "-");

  const l = s.ledger;
  text("ledger-status", l.ok ? "writing" : "FAILING");
  $("ledger-status").className = "big " + (l.ok ? "" : "error");
  text("ledger-queue", l.queue);
  text("ledger-lag", fmtNum(l.lag_seconds));
  text("ledger-failures", l.failures);

  rows($("grid-states").tBodies[0], s.grid_states, (g) => [[fmtTime(g.slot)], [g.grid_state, g.grid_state]]);
  rows($("book").tBodies[0], s.book, (b) => [
    [fmtTime(b.slot)], [b.grid_state, b.grid_state], [b.bids], [b.bid_wh], [fmtNum(b.best_bid)],
    [fmtNum(b.best_ask)], [b.ask_wh], [b.asks],
  ]);
  rows($("fills").tBodies[0], s.fills, (f) => [
    [f.commit_id], [fmtTime(f.slot)], [f.seller], [f.buyer], [f.quantity], [fmtNum(f.price_buy)], [fmtNum(f.price_sell)],
  ]);
  chart(s.rounds);
}

function tick() {
  if (!countdown) { text("round-countdown", "the controller's next step"); return; }
  const left = Math.max(0, countdown.closesIn - Math.floor((Date.now() - countdown.at) / 1000));
  text("round-countdown", `${left} s`);
}

function chart(rounds) {
  const cv = $("chart");
  const g = cv.getContext("2d");
  const w = cv.width, h = cv.height, pad = 30;
  g.clearRect(0, 0, w, h);
  g.font = "12px system-ui, sans-serif";
  g.fillStyle = "#46505c";
  if (!rounds.length) { g.fillText("no clearing yet", pad, h / 2); return; }
  const maxWh = Math.max(1, ...rounds.map((r) => r.volume_wh));
  const prices = rounds.map((r) => r.price_buy).filter((x) => x !== null);
  const lo = prices.length ? Math.min(...prices) : 0, hi = prices.length ? Math.max(...prices) : 1;
  const bw = (w - 2 * pad) / rounds.length;
  g.fillStyle = "#9cc3e6";
  rounds.forEach((r, i) => {
    const bh = (h - 2 * pad) * r.volume_wh / maxWh;
    g.fillRect(pad + i * bw + 1, h - pad - bh, Math.max(1, bw - 2), bh);
  });
  g.strokeStyle = "#c2410c";
  g.lineWidth = 2;
  g.beginPath();
  let first = true;
  rounds.forEach((r, i) => {
    if (r.price_buy === null) return;
    const y = h - pad - (h - 2 * pad) * (hi > lo ? (r.price_buy - lo) / (hi - lo) : 0.5);
    const x = pad + (i + 0.5) * bw;
    if (first) g.moveTo(x, y); else g.lineTo(x, y);
    first = false;
  });
  g.stroke();
  g.fillStyle = "#c2410c";
  rounds.forEach((r, i) => {
    if (r.price_buy === null) return;
    const y = h - pad - (h - 2 * pad) * (hi > lo ? (r.price_buy - lo) / (hi - lo) : 0.5);
    g.beginPath();
    g.arc(pad + (i + 0.5) * bw, y, 3, 0, 2 * Math.PI);
    g.fill();
  });
  g.fillStyle = "#46505c";
  g.fillText(`bars: P2P Wh per cleared slot (max ${maxWh})`, pad, 14);
  g.fillStyle = "#c2410c";
  g.fillText(`line: clearing price ${fmtNum(lo)} - ${fmtNum(hi)}`, w / 2, 14);
}

let observer = null;

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  text("login-error", "");
  if (observer) observer.ws.close();
  status("connecting");
  const auth = { id: $("login-id").value, token: $("login-token").value };
  let refused = false;
  observer = new Observer(auth, {
    connected: () => {
      status("live", "ok");
      $("login").hidden = true;
      $("board").hidden = false;
      observer.emit("snapshot", {}, (reply) => { if (reply && reply.ok) render(reply.snapshot); });
    },
    refused: (message) => {
      refused = true;
      text("login-error", message || "refused");
      status("refused", "bad");
    },
    closed: () => {
      if (!refused) {
        status("disconnected", "bad");
        if ($("board").hidden) text("login-error", "the market server closed the connection");
      }
    },
    snapshot: render,
  });
});

setInterval(tick, 1000);
