// The synchronized viewer. One master clock in wall-clock milliseconds; every stream is
// slaved to it: a video or audio element is kept at its playlist position for the master's
// time (nudging playbackRate when slightly off, seeking when far off), a PNG stream shows
// its latest frame at or before that time. The master waits while a playing one buffers.
// A participant's audio plays in their webcam's tile, or in a tile of its own when they
// send no video; each such tile has Mute and Solo.
"use strict";

(() => {
  const SEEK_S = 0.25; // further off than this: seek
  const NUDGE_S = 0.02; // further off than this: nudge playbackRate toward the master
  // Audio is nudged sooner: its clock advances in steps of its output buffer, and falls
  // behind by tens of milliseconds between them where a dead band lets it.
  const AUDIO_NUDGE_S = 0.005;
  const TICK_MS = 40;
  const END_GRACE_MS = 3000; // past the end, how long to wait for videos to report `ended`
  const token = new URLSearchParams(location.search).get("token") || "";
  const query = token ? "?token=" + encodeURIComponent(token) : "";
  const base = location.pathname.replace(/\/+$/, "");
  const $ = (id) => document.getElementById(id);

  const master = { wall: 0, playing: false, finished: false, waiting: false, last: 0, endedAt: 0 };
  const streams = [];
  const listening = { muted: new Set(), solo: null };
  let info = null;
  let dragging = false;

  function problem(text) {
    const p = $("problem");
    p.hidden = false;
    p.textContent = text;
  }

  // The last index of `items` whose wall_ms is at or before `wall`, or -1.
  function lastAtOrBefore(items, wall) {
    let lo = 0;
    let hi = items.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (items[mid].wall_ms <= wall) {
        found = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    return found;
  }

  // Where in its playlist a video stream is at wall-clock `wall`; null before it starts and
  // between segments that do not abut (the participant paused).
  function positionAt(s, wall) {
    const segments = s.meta.segments;
    const i = lastAtOrBefore(segments, wall);
    if (i < 0) return null;
    const into = (wall - segments[i].wall_ms) / 1000;
    if (into > segments[i].duration + 0.001) return null;
    return s.positions[i] + Math.min(into, segments[i].duration);
  }

  function tile(meta) {
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = `${meta.name} · ${meta.type}${meta.format === "png" ? " (PNG)" : ""}`;
    figure.appendChild(caption);
    figure.dataset.participant = meta.participant_id;
    figure.dataset.type = meta.type;
    $("grid").appendChild(figure);
    return figure;
  }

  // Which audio is heard: the soloed participant's alone, else everyone's not muted.
  function applyListening() {
    for (const s of streams) {
      if (s.kind !== "audio") continue;
      const pid = s.meta.participant_id;
      s.el.muted = listening.solo !== null ? listening.solo !== pid : listening.muted.has(pid);
    }
    for (const button of document.querySelectorAll("button[data-listen]")) {
      const pid = button.dataset.participant;
      const on = button.dataset.listen === "mute"
        ? listening.muted.has(pid) : listening.solo === pid;
      button.setAttribute("aria-pressed", String(on));
    }
  }

  function listenButton(figure, pid, action, label) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.dataset.listen = action;
    button.dataset.participant = pid;
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", () => {
      if (action === "mute") {
        if (listening.muted.has(pid)) listening.muted.delete(pid);
        else listening.muted.add(pid);
      } else {
        listening.solo = listening.solo === pid ? null : pid;
      }
      applyListening();
    });
    figure.querySelector(".listen").appendChild(button);
  }

  // A participant's audio goes into their webcam's tile, or into a tile of its own.
  function audioTile(meta) {
    const pid = meta.participant_id;
    let figure = document.querySelector(`figure[data-participant="${CSS.escape(pid)}"]`
      + '[data-type="webcam"]');
    if (!figure) {
      figure = tile(meta);
      figure.classList.add("voice");
    }
    const bar = document.createElement("div");
    bar.className = "listen";
    figure.appendChild(bar);
    listenButton(figure, pid, "mute", "Mute");
    listenButton(figure, pid, "solo", "Solo");
    return figure;
  }

  function addMedia(meta) {
    const audio = meta.type === "audio";
    const figure = audio ? audioTile(meta) : tile(meta);
    const video = document.createElement(audio ? "audio" : "video");
    video.muted = !audio;
    video.playsInline = true;
    video.preload = "auto";
    const s = {
      meta, figure, el: video, kind: audio ? "audio" : "video", positions: [], total: 0,
      active: false, ownTile: !audio || figure.classList.contains("voice"),
      sizes: [], errors: [], warnings: [], ended: false, maxTime: 0, maxDrift: 0, samples: 0,
      seeks: 0, settleUntil: 0, hls: null,
    };
    for (const segment of meta.segments) {
      s.positions.push(s.total);
      s.total += segment.duration;
    }
    if (!audio) {
      video.addEventListener("resize", () => s.sizes.push([video.videoWidth, video.videoHeight]));
    }
    video.addEventListener("ended", () => { s.ended = true; });
    video.addEventListener("error", () => {
      const e = video.error;
      s.errors.push(`media error ${e ? e.code : "?"}: ${e ? e.message : ""}`);
    });
    if (window.Hls && window.Hls.isSupported()) {
      const hls = new window.Hls({ startPosition: 0, maxBufferLength: 30, backBufferLength: 30 });
      hls.on(window.Hls.Events.ERROR, (_, data) => {
        if (!data.fatal) {
          s.warnings.push(`${data.type}: ${data.details}`);
          return;
        }
        s.errors.push(`hls ${data.type}: ${data.details}`);
        if (data.type === window.Hls.ErrorTypes.MEDIA_ERROR) hls.recoverMediaError();
        else if (data.type === window.Hls.ErrorTypes.NETWORK_ERROR) hls.startLoad();
      });
      hls.loadSource(meta.playlist_url);
      hls.attachMedia(video);
      s.hls = hls;
    } else if (video.canPlayType("application/vnd.apple.mpegurl")) {
      video.src = meta.playlist_url; // Safari plays HLS itself
    } else {
      s.errors.push("this browser plays neither HLS nor Media Source Extensions");
    }
    figure.appendChild(video);
    return s;
  }

  function addImage(meta) {
    const figure = tile(meta);
    const img = document.createElement("img");
    img.alt = `${meta.name} ${meta.type}`;
    const s = {
      meta, figure, el: img, kind: "png", shown: -1, cache: new Map(), active: false,
      sizes: [], errors: [], warnings: [], ended: false, frames: 0,
    };
    img.addEventListener("load", () => {
      s.frames += 1;
      const last = s.sizes[s.sizes.length - 1];
      if (!last || last[0] !== img.naturalWidth || last[1] !== img.naturalHeight) {
        s.sizes.push([img.naturalWidth, img.naturalHeight]);
      }
    });
    figure.appendChild(img);
    return s;
  }

  // One PNG out of its tar batch: a ranged GET (a presigned S3 URL or the service).
  function loadFrame(s, i) {
    if (s.cache.has(i)) return s.cache.get(i);
    const frame = s.meta.frames[i];
    const range = `bytes=${frame.offset}-${frame.offset + frame.size - 1}`;
    const promise = fetch(frame.url, { headers: { Range: range }, referrerPolicy: "no-referrer" })
      .then((response) => {
        if (!response.ok) throw new Error(`frame at ${frame.relative} s: HTTP ${response.status}`);
        return response.arrayBuffer();
      })
      .then((buffer) => {
        // A server that ignores Range sends the whole batch.
        const png = buffer.byteLength === frame.size
          ? buffer : buffer.slice(frame.offset, frame.offset + frame.size);
        return URL.createObjectURL(new Blob([png], { type: "image/png" }));
      });
    s.cache.set(i, promise);
    if (s.cache.size > 32) {
      const [oldest, url] = s.cache.entries().next().value;
      s.cache.delete(oldest);
      url.then((u) => URL.revokeObjectURL(u), () => {});
    }
    return promise;
  }

  function syncImage(s) {
    const m = s.meta;
    s.active = master.wall >= m.start_ms && master.wall < m.end_ms;
    s.figure.classList.toggle("off", !s.active);
    if (master.wall >= m.end_ms) s.ended = true;
    if (!s.active) return;
    s.ended = false;
    const i = lastAtOrBefore(m.frames, master.wall);
    if (i < 0 || i === s.shown) return;
    s.shown = i;
    loadFrame(s, i).then((url) => {
      if (s.shown === i) s.el.src = url;
    }, (error) => s.errors.push(String(error)));
    if (i + 1 < m.frames.length) loadFrame(s, i + 1).catch(() => {});
  }

  // A tile says "not sending" when its own stream is off; audio in a webcam's tile leaves
  // that to the video.
  function showOff(s, off) {
    if (s.ownTile) s.figure.classList.toggle("off", off);
  }

  function syncMedia(s, now) {
    const v = s.el;
    const m = s.meta;
    s.maxTime = Math.max(s.maxTime, v.currentTime);
    if (master.wall >= m.end_ms && s.total - v.currentTime < 0.5) {
      // At its end: let it play out its last frames and report `ended`.
      s.active = false;
      showOff(s, s.ended);
      if (master.playing && v.paused && !v.ended) v.play().catch(() => {});
      if (!master.playing && !v.paused) v.pause();
      return;
    }
    const position = positionAt(s, master.wall);
    s.active = position !== null;
    showOff(s, !s.active);
    if (position === null) {
      if (!v.paused) v.pause();
      return;
    }
    if (v.readyState < 1 || v.seeking) return;
    const drift = v.currentTime - position;
    if (!master.playing) {
      if (!v.paused) v.pause();
      if (Math.abs(drift) > 0.02) v.currentTime = position;
      return;
    }
    if (Math.abs(drift) > SEEK_S) {
      v.currentTime = position;
      v.playbackRate = 1;
      s.seeks += 1;
      s.settleUntil = now + 500;
      return;
    }
    const band = s.kind === "audio" ? AUDIO_NUDGE_S : NUDGE_S;
    const nudge = Math.abs(drift) > band ? Math.min(1.25, Math.max(0.75, 1 - drift * 2)) : 1;
    if (v.playbackRate !== nudge) v.playbackRate = nudge;
    if (v.paused && !v.ended) {
      // A (re)start takes a moment to reach the output (audio most of all): the nudge
      // closes the gap, and the drift is measured once it has.
      v.play().catch(() => {});
      s.settleUntil = Math.max(s.settleUntil, now + 500);
    }
    if (!v.paused && v.readyState >= 3 && now > s.settleUntil) {
      s.samples += 1;
      s.maxDrift = Math.max(s.maxDrift, Math.abs(drift));
    }
  }

  function buffering() {
    return streams.some((s) => s.kind !== "png" && s.active && !s.errors.length
      && s.el.readyState < 3);
  }

  function tick() {
    const now = performance.now();
    const elapsed = now - master.last;
    master.last = now;
    if (master.playing) {
      master.waiting = buffering();
      if (!master.waiting) master.wall = Math.min(info.end_ms, master.wall + elapsed);
      if (master.wall >= info.end_ms) {
        master.endedAt = master.endedAt || now;
        const done = streams.every((s) => s.kind === "png" || s.ended || s.errors.length
          || s.total - s.el.currentTime >= 0.5);
        if (done || now - master.endedAt > END_GRACE_MS) {
          master.playing = false;
          master.finished = true;
        }
      }
    }
    for (const s of streams) {
      if (s.kind !== "png") syncMedia(s, now);
      else syncImage(s);
    }
    render();
  }

  function render() {
    const at = new Date(master.wall);
    const offset = ((master.wall - info.start_ms) / 1000).toFixed(1);
    $("clock").textContent = `${at.toISOString()} (+${offset} s)${master.waiting ? " buffering" : ""}`;
    $("play").textContent = master.playing ? "Pause" : "Play";
    if (!dragging) $("seek").value = String(Math.round(master.wall));
  }

  function play() {
    if (master.finished || master.wall >= info.end_ms) master.wall = info.start_ms;
    master.finished = false;
    master.endedAt = 0;
    master.playing = true;
    master.last = performance.now();
  }

  function pause() {
    master.playing = false;
  }

  function seek(wall) {
    master.wall = Math.max(info.start_ms, Math.min(info.end_ms, wall));
    master.finished = false;
    master.endedAt = 0;
    for (const s of streams) {
      if (s.kind === "png") continue;
      const position = positionAt(s, master.wall);
      if (position !== null && s.el.readyState >= 1) s.el.currentTime = position;
      s.settleUntil = performance.now() + 500;
    }
  }

  function report() {
    return {
      wall_ms: master.wall,
      start_ms: info && info.start_ms,
      end_ms: info && info.end_ms,
      playing: master.playing,
      finished: master.finished,
      streams: streams.map((s) => ({
        participant_id: s.meta.participant_id,
        type: s.meta.type,
        format: s.meta.format,
        sizes: s.sizes,
        errors: s.errors,
        warnings: s.warnings,
        ended: s.ended,
        max_time: s.maxTime,
        max_drift: s.maxDrift,
        samples: s.samples,
        seeks: s.seeks,
        frames_shown: s.frames,
        media_error: s.kind !== "png" && s.el.error ? s.el.error.code : null,
        muted: s.kind === "audio" ? s.el.muted : null,
      })),
    };
  }

  async function start() {
    const response = await fetch(`${base}/streams.json${query}`, { referrerPolicy: "no-referrer" });
    if (!response.ok) {
      problem(`Cannot load the recording: HTTP ${response.status} ${await response.text()}`);
      return;
    }
    info = await response.json();
    document.title = `Recording ${info.recording_id}`;
    // Pictures first, so that each participant's audio finds their webcam's tile.
    for (const meta of info.streams) {
      if (meta.type === "audio") continue;
      streams.push(meta.format === "h264" ? addMedia(meta) : addImage(meta));
    }
    for (const meta of info.streams) {
      if (meta.type === "audio") streams.push(addMedia(meta));
    }
    master.wall = info.start_ms;
    master.last = performance.now();
    const bar = $("seek");
    bar.min = String(Math.floor(info.start_ms));
    bar.max = String(Math.ceil(info.end_ms));
    bar.disabled = false;
    bar.addEventListener("pointerdown", () => { dragging = true; });
    bar.addEventListener("pointerup", () => { dragging = false; });
    bar.addEventListener("input", () => seek(Number(bar.value)));
    const button = $("play");
    button.disabled = false;
    button.addEventListener("click", () => (master.playing ? pause() : play()));
    setInterval(tick, TICK_MS);
    window.viewer.ready = true;
  }

  window.viewer = { ready: false, play, pause, seek, report };
  start().catch((error) => problem(`Cannot start the viewer: ${error}`));
})();
