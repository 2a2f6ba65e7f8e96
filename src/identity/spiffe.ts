/**
 * SPIFFE IDs: parsed once into a typed value, validated by the SPIFFE
 * standard's rules (trust domain lowercase `[a-z0-9._-]`, at most 255 bytes,
 * no port or userinfo; path segments `[a-zA-Z0-9._-]`, none empty, `.` or
 * `..`, no trailing slash, no percent-encoding, no query or fragment; the
 * whole ID at most 2048 bytes), plus knit's two shapes:
 * `/ns/<namespace>/svc/<service>` for services, `/agent/<node>` for agents and
 * `/server/<name>` for control-plane servers.
 */
import { KnitError } from '../errors.js';

const TRUST_DOMAIN_RE = /^[a-z0-9._-]+$/;
const SEGMENT_RE = /^[a-zA-Z0-9._-]+$/;
/** SPIFFE caps: 255 bytes for a trust domain, 2048 for the whole URI. */
const MAX_TRUST_DOMAIN = 255;
const MAX_ID = 2048;
const PREFIX = 'spiffe://';

/** What a knit SPIFFE ID names. */
export type SpiffeKind =
  | { kind: 'service'; namespace: string; service: string }
  | { kind: 'agent'; node: string }
  | { kind: 'server'; name: string }
  | { kind: 'other' };

/** A validated SPIFFE ID. Build with `parseSpiffeId`, `serviceId` or `agentId`. */
export interface SpiffeId {
  readonly trustDomain: string;
  /** The path, starting with `/`, or `''` for a trust domain's own ID. */
  readonly path: string;
  readonly what: SpiffeKind;
  /** The canonical URI form. */
  readonly uri: string;
}

function fail(input: string, why: string): never {
  throw new KnitError('KNIT_ERR_SPIFFE_ID', `invalid SPIFFE ID ${JSON.stringify(input.slice(0, 200))}: ${why}`);
}

/** Checks a trust domain name by the SPIFFE rules; throws KNIT_ERR_SPIFFE_ID. */
export function validateTrustDomain(td: string): string {
  if (td.length === 0) fail(td, 'trust domain is empty');
  if (Buffer.byteLength(td) > MAX_TRUST_DOMAIN) fail(td, `trust domain longer than ${MAX_TRUST_DOMAIN} bytes`);
  if (td.includes(':')) fail(td, 'trust domain must not have a port');
  if (td.includes('@')) fail(td, 'trust domain must not have userinfo');
  if (!TRUST_DOMAIN_RE.test(td)) fail(td, 'trust domain may only contain lowercase letters, digits, ".", "-" and "_"');
  return td;
}

/** Checks one path segment (a namespace, service or node name). */
export function validateSegment(seg: string, what = 'path segment'): string {
  if (seg.length === 0) fail(seg, `${what} is empty`);
  if (seg === '.' || seg === '..') fail(seg, `${what} must not be "." or ".."`);
  if (!SEGMENT_RE.test(seg)) fail(seg, `${what} ${JSON.stringify(seg)} may only contain letters, digits, ".", "-" and "_"`);
  return seg;
}

function classify(segments: string[]): SpiffeKind {
  if (segments.length === 4 && segments[0] === 'ns' && segments[2] === 'svc') {
    return { kind: 'service', namespace: segments[1]!, service: segments[3]! };
  }
  if (segments.length === 2 && segments[0] === 'agent') return { kind: 'agent', node: segments[1]! };
  if (segments.length === 2 && segments[0] === 'server') return { kind: 'server', name: segments[1]! };
  return { kind: 'other' };
}

/** Parses and validates a SPIFFE ID URI; throws KNIT_ERR_SPIFFE_ID naming the rule broken. */
export function parseSpiffeId(input: string): SpiffeId {
  if (Buffer.byteLength(input) > MAX_ID) fail(input, `longer than ${MAX_ID} bytes`);
  if (!input.startsWith(PREFIX)) fail(input, 'must start with "spiffe://" (lowercase scheme)');
  const rest = input.slice(PREFIX.length);
  if (rest.includes('?')) fail(input, 'must not have a query');
  if (rest.includes('#')) fail(input, 'must not have a fragment');
  if (rest.includes('%')) fail(input, 'must not be percent-encoded');
  const slash = rest.indexOf('/');
  const td = slash === -1 ? rest : rest.slice(0, slash);
  const path = slash === -1 ? '' : rest.slice(slash);
  validateTrustDomain(td);
  const segments: string[] = [];
  if (path !== '') {
    if (path.endsWith('/')) fail(input, 'path must not end with "/"');
    for (const seg of path.slice(1).split('/')) segments.push(validateSegment(seg));
  }
  return Object.freeze({ trustDomain: td, path, what: classify(segments), uri: `${PREFIX}${td}${path}` });
}

/** The ID of a service: `spiffe://<td>/ns/<namespace>/svc/<service>`. */
export function serviceId(trustDomain: string, service: string, namespace = 'default'): SpiffeId {
  validateSegment(namespace, 'namespace');
  validateSegment(service, 'service name');
  return parseSpiffeId(`${PREFIX}${trustDomain}/ns/${namespace}/svc/${service}`);
}

/** The ID of a host agent: `spiffe://<td>/agent/<node>`. */
export function agentId(trustDomain: string, node: string): SpiffeId {
  validateSegment(node, 'node name');
  return parseSpiffeId(`${PREFIX}${trustDomain}/agent/${node}`);
}

/** The ID of a control-plane server: `spiffe://<td>/server/<name>`. */
export function serverId(trustDomain: string, name: string): SpiffeId {
  validateSegment(name, 'server name');
  return parseSpiffeId(`${PREFIX}${trustDomain}/server/${name}`);
}

/** The trust domain's own ID, used for signing certificates. */
export function trustDomainId(trustDomain: string): SpiffeId {
  return parseSpiffeId(`${PREFIX}${trustDomain}`);
}

/** The service name of a service ID, or undefined for any other kind. */
export function serviceNameOf(id: SpiffeId): string | undefined {
  return id.what.kind === 'service' ? id.what.service : undefined;
}
