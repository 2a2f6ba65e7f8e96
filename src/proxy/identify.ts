/**
 * The identify stage: who is at the other end of a TLS connection. The
 * chain as OpenSSL verified it against the trust bundle, then the leaf as
 * an X.509-SVID (identity/peer.ts), then knit's own rules: a service (not
 * an agent or a server) of this trust domain and namespace. A refusal
 * carries a short reason to count and the detail to log. For a connection
 * the client side opened, the server must also be exactly the destination
 * it dialled.
 *
 * (On the source side the caller is identified by the upstream port its
 * application connected to: that port belongs to one local service.)
 */
import type { TLSSocket } from 'node:tls';
import { peerChainVerdict, verdictDetail, type PeerIdentityReader, type PeerRole } from '../identity/peer.js';
import type { SpiffeId } from '../identity/spiffe.js';

/** A peer that proved a service identity, or why not. */
export type Identified =
  | { ok: true; id: SpiffeId; service: string; notAfter: Date }
  | { ok: false; reason: string; fields: Record<string, unknown>; detail: string };

/** Reads and checks the identity the peer of `socket` proved. */
export function identifyPeer(socket: TLSSocket, role: PeerRole, reader: PeerIdentityReader, trustDomain: string, namespace: string, expected?: string): Identified {
  const chain = peerChainVerdict(socket, role);
  if (!chain.ok) {
    const { text, ...fields } = verdictDetail(chain);
    return { ok: false, reason: chain.reason, fields, detail: text };
  }
  const peer = reader.read(socket, trustDomain, role);
  const no = (reason: string): Identified => ({ ok: false, reason, fields: {}, detail: '' });
  if (!peer.ok) return no(peer.reason);
  const what = peer.id.what;
  if (expected !== undefined && peer.id.uri !== expected) return no(`${role} is ${peer.id.uri}, expected ${expected}`);
  if (what.kind !== 'service') return no(`peer ${peer.id.uri} is not a service identity`);
  if (what.namespace !== namespace) return no(`peer ${peer.id.uri} is in namespace ${what.namespace}, this mesh accepts only namespace ${namespace}`);
  return { ok: true, id: peer.id, service: what.service, notAfter: peer.notAfter };
}
