// Test helpers installed into every page the browser tests open. They use only the browser's
// WebSocket API, exactly as a web page would.
(() => {
  // Deterministic bytes: byte i of pattern(seed) is (i * 31 + seed) mod 251 (a prime, so the
  // pattern does not repeat on power-of-two boundaries). Rust computes the same.
  window.pattern = (n, seed) => {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) % 251;
    return b;
  };
  window.matchesPattern = (bytes, seed, offset = 0) => {
    for (let i = 0; i < bytes.length; i++) if (bytes[i] !== ((offset + i) * 31 + seed) % 251) return false;
    return true;
  };
  const hex = (bytes) => Array.from(bytes, (x) => x.toString(16).padStart(2, "0")).join("");

  // Records every event of one WebSocket until `onclose`, and resolves with the list.
  // Each entry: {type, readyState, ...}: open {protocol}; message {kind, size, text | hex};
  // error {}; close {code, reason, wasClean}. `options.onopen(ws, rec)` and
  // `options.onmessage(ws, rec, entry)` script the page's side.
  window.wsgateScenario = (url, options = {}) =>
    new Promise((resolve) => {
      const rec = { events: [], bytes: 0, data: [] };
      const pending = [];
      const ws = options.protocols ? new WebSocket(url, options.protocols) : new WebSocket(url);
      if (options.binaryType) ws.binaryType = options.binaryType;
      rec.events.push({ type: "created", readyState: ws.readyState });
      ws.onopen = () => {
        rec.events.push({ type: "open", readyState: ws.readyState, protocol: ws.protocol });
        if (options.onopen) options.onopen(ws, rec);
      };
      ws.onmessage = (e) => {
        const entry = { type: "message", readyState: ws.readyState };
        rec.events.push(entry);
        const fill = async () => {
          if (typeof e.data === "string") {
            Object.assign(entry, { kind: "text", text: e.data, size: e.data.length });
          } else {
            const kind = e.data instanceof Blob ? "blob" : e.data instanceof ArrayBuffer ? "arraybuffer" : typeof e.data;
            const bytes = new Uint8Array(e.data instanceof Blob ? await e.data.arrayBuffer() : e.data);
            Object.assign(entry, { kind, size: bytes.length });
            if (options.keepBytes) rec.data.push(bytes);
            else if (bytes.length <= 4096) entry.hex = hex(bytes);
          }
          rec.bytes += entry.size;
          if (options.onmessage) options.onmessage(ws, rec, entry);
        };
        pending.push(fill());
      };
      ws.onerror = () => rec.events.push({ type: "error", readyState: ws.readyState });
      ws.onclose = async (e) => {
        rec.events.push({ type: "close", readyState: ws.readyState, code: e.code, reason: e.reason, wasClean: e.wasClean });
        await Promise.all(pending);
        if (options.onclose) options.onclose(ws, rec);
        resolve({ events: rec.events, bytes: rec.bytes, result: rec.result });
      };
    });
  return true;
})();
