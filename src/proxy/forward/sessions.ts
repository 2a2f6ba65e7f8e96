/**
 * TLS 1.3 session tickets for dialing mesh peers, each kept with what its
 * full handshake proved.
 *
 * A resumed handshake skips the certificate exchange and its signatures
 * (several times cheaper than a full one), and so shows the client no
 * certificate: the server's identity is the one proven in the full
 * handshake that issued the ticket. Only a server holding that session's
 * secret can resume it, so the identity travels with the ticket.
 *
 * The two are taken together, once, before the handshake (`take` returns
 * a snapshot). A dial never looks its ticket's identity up again by
 * endpoint afterwards: meanwhile another connection to the same endpoint
 * may have failed and dropped the entry, or a certificate renewal may have
 * cleared the cache, and a valid resumed connection would then find no
 * identity and be refused as "no certificate".
 *
 * Entries are dropped on renewal (`clear`: new sessions must carry the new
 * client leaf, and a ticket from a dial begun before the renewal is not
 * stored), on any failure of the endpoint (`forget`), for endpoints that
 * left the endpoint set (`retain`), and once the server leaf it proved has
 * expired (a resumed handshake has no certificate to re-check).
 */

/** What a full handshake proved, stored with its ticket. */
export interface Proven {
  /** The server's verified SPIFFE ID (URI). */
  peer: string;
  /** The server leaf's expiry, in ms since the epoch. */
  notAfter: number;
}

/** A ticket and its proof, taken together before a handshake; unaffected by later cache changes. */
export interface Resumption extends Proven {
  readonly ticket: Buffer;
}

/** Captured when a dial begins: what to resume with, and the cache generation a new ticket belongs to. */
export interface SessionTake {
  resume?: Readonly<Resumption>;
  generation: number;
}

/** Tickets by endpoint key (address:port); see the module doc. */
export class SessionCache {
  private readonly map = new Map<string, Readonly<Resumption>>();
  private generation = 0;

  constructor(private readonly now: () => number = Date.now) {}

  /** What a dial to `key` should resume with (if anything), captured now, with the current generation. */
  take(key: string): SessionTake {
    const e = this.map.get(key);
    if (e && e.notAfter <= this.now()) this.map.delete(key);
    const resume = this.map.get(key);
    return { resume, generation: this.generation };
  }

  /**
   * Stores a ticket a dial received with what that dial proved, unless the
   * cache was cleared since the dial began (`generation` is stale).
   */
  put(key: string, generation: number, ticket: Buffer, proven: Proven): void {
    if (generation !== this.generation) return;
    this.map.set(key, Object.freeze({ ticket, peer: proven.peer, notAfter: proven.notAfter }));
  }

  /** Drops the ticket of an endpoint that failed. */
  forget(key: string): void {
    this.map.delete(key);
  }

  /** Drops the tickets of endpoints not in `keys` (they left the endpoint set). */
  retain(keys: ReadonlySet<string>): void {
    for (const k of [...this.map.keys()]) if (!keys.has(k)) this.map.delete(k);
  }

  /** Drops every ticket and refuses tickets from dials begun before now (a renewal). */
  clear(): void {
    this.map.clear();
    this.generation++;
  }

  /** Endpoints with a ticket. */
  get size(): number {
    return this.map.size;
  }

  /** Whether `key` has a ticket (tests, admin API). */
  has(key: string): boolean {
    return this.map.has(key);
  }
}
