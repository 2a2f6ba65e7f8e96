/**
 * A flow is one application connection as the node proxy carries it: on
 * the source host, a connection an application opened to an upstream
 * port; on the destination host, the HBONE stream (or same-host hand-off)
 * that delivers it to the local application. Every stage passes the flow
 * on; it ends with a reason. `FlowTable` holds the open ones: the admin
 * API lists them (`knit flows`), and when intentions change every flow
 * this host enforces is decided again and the ones now denied are closed
 * (ztunnel's connection manager).
 */
import type { Socket } from 'node:net';
import type { Decision } from '../policy/intentions.js';

/** One end of a flow: the service, its proven SPIFFE ID where one was proven, and an address. */
export interface FlowEnd {
  service: string;
  id?: string;
  address?: string;
}

/**
 * Where the flow is, as this host sees it: `outbound` (an application here
 * opened it), `inbound` (it arrived over HBONE for a service here), `local`
 * (both ends here: the same-host path, no TLS, no tunnel), `unauthenticated`
 * (transparent mode: a plaintext client outside the mesh that a permissive
 * service accepted; no identity, so intentions do not apply to it).
 */
export type FlowSide = 'outbound' | 'inbound' | 'local' | 'unauthenticated';

/** A flow as the admin API shows it. */
export interface FlowView {
  id: number;
  side: FlowSide;
  source: FlowEnd;
  destination: FlowEnd;
  /** The rule that allowed it (where this host decided). */
  rule?: string;
  /** Bytes from the application that opened it / delivered to it. */
  bytesSent: number;
  bytesReceived: number;
  startedAt: string;
  ageMs: number;
  /** The tunnel it rides, for HBONE flows: `<source id> -> <destination id> @ <agent>`. */
  tunnel?: string;
}

export class Flow {
  readonly startedAt = Date.now();
  rule?: string;
  tunnel?: string;
  /** Set once it ended. */
  ended?: string;
  private closer: ((reason: string) => void) | undefined;

  constructor(
    /** Unique within its table. */
    readonly id: number,
    readonly side: FlowSide,
    readonly source: FlowEnd,
    readonly destination: FlowEnd,
    /** The application socket on this host (its byte counters are the flow's). */
    readonly app: Socket,
  ) {}

  /** How a stage tears the flow down when policy says so; set by the forward stage. */
  onClose(fn: (reason: string) => void): void {
    this.closer = fn;
  }

  /** Ends the flow now, with a reason (intentions changed, service stopped, certificate gone). */
  close(reason: string): void {
    if (this.ended) return;
    this.ended = reason;
    this.closer?.(reason);
  }

  /** Bytes the application that opened the flow sent, and received (on this host's application socket). */
  bytes(): { sent: number; received: number } {
    // Where the opener is here, bytes read from its socket are what it sent; where the flow was delivered here, the reverse.
    const outbound = this.side === 'outbound' || this.side === 'local';
    return { sent: outbound ? this.app.bytesRead : this.app.bytesWritten, received: outbound ? this.app.bytesWritten : this.app.bytesRead };
  }

  view(now = Date.now()): FlowView {
    const bytes = this.bytes();
    return {
      id: this.id,
      side: this.side,
      source: this.source,
      destination: this.destination,
      rule: this.rule,
      bytesSent: bytes.sent,
      bytesReceived: bytes.received,
      startedAt: new Date(this.startedAt).toISOString(),
      ageMs: now - this.startedAt,
      tunnel: this.tunnel,
    };
  }
}

/** Every open flow of this host. */
export class FlowTable {
  private readonly open = new Set<Flow>();
  private nextId = 1;

  /** A new open flow. */
  create(side: FlowSide, source: FlowEnd, destination: FlowEnd, app: Socket): Flow {
    const f = new Flow(this.nextId++, side, source, destination, app);
    this.open.add(f);
    return f;
  }

  delete(f: Flow): void {
    this.open.delete(f);
  }

  get size(): number {
    return this.open.size;
  }

  list(): Flow[] {
    return [...this.open];
  }

  /**
   * Decides every flow this host enforces (`inbound` and `local`) again and
   * closes the ones now denied; returns them with the decision that closed
   * them.
   */
  reauthorize(decide: (f: Flow) => Decision): Array<{ flow: Flow; decision: Decision }> {
    const closed: Array<{ flow: Flow; decision: Decision }> = [];
    for (const f of [...this.open]) {
      if (f.side !== 'inbound' && f.side !== 'local') continue;
      const d = decide(f);
      if (d.allow) {
        f.rule = d.rule;
        continue;
      }
      closed.push({ flow: f, decision: d });
      f.close(`denied by ${d.rule}`);
    }
    return closed;
  }

  /** Closes every flow matching `pred`. */
  closeWhere(pred: (f: Flow) => boolean, reason: string): number {
    let n = 0;
    for (const f of [...this.open]) {
      if (!pred(f)) continue;
      f.close(reason);
      n++;
    }
    return n;
  }
}
