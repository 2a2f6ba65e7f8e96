/**
 * The agent's client of the control plane (`knit server`) over HTTPS:
 * enrolment with a join token, renewal of its own identity with that
 * identity, and service leaves. The server must prove a
 * `spiffe://<td>/server/<name>` identity chained to the trust bundle.
 */
import { X509Certificate } from 'node:crypto';
import type { PeerCertificate } from 'node:tls';
import { Agent as Dispatcher, request } from 'undici';
import { KnitError } from '../errors.js';
import { agentId } from '../identity/spiffe.js';
import { certInfoFromDer } from '../identity/x509.js';
import { createCsr, validateLeaf, type SignedLeaf } from '../identity/ca.js';
import type { ServiceTls } from '../proxy/tls.js';
import type { CertSigner } from './certs.js';
import { caHash, parseJoinToken } from '../server/tokens.js';

/** Checks that a server certificate carries a control-plane identity of `trustDomain`. */
export function checkServer(trustDomain: string | undefined) {
  return (_host: string, cert: PeerCertificate): Error | undefined => {
    try {
      const info = certInfoFromDer(cert.raw);
      if (info.uris.length !== 1) return new Error(`control plane certificate has ${info.uris.length} URI SANs`);
      const id = info.spiffeId;
      if (!id) return new Error(`control plane URI SAN ${info.uris[0]} is not a SPIFFE ID`);
      if (id.what.kind !== 'server') return new Error(`${id.uri} is not a control-plane identity`);
      if (trustDomain && id.trustDomain !== trustDomain) return new Error(`${id.uri} is not in trust domain ${trustDomain}`);
    } catch (e) {
      return e as Error;
    }
    return undefined;
  };
}

interface Signed {
  cert: string;
  chain: string[];
  roots: string[];
  trustDomain?: string;
}

/** POSTs JSON; maps transport failures to KNIT_ERR_SERVER_UNAVAILABLE and error answers to their code. */
async function post(server: string, path: string, body: unknown, dispatcher: Dispatcher): Promise<Signed> {
  let res;
  try {
    res = await request(`${server}${path}`, {
      method: 'POST',
      body: JSON.stringify(body),
      headers: { 'content-type': 'application/json' },
      dispatcher,
      signal: AbortSignal.timeout(15_000),
    });
  } catch (e) {
    throw new KnitError('KNIT_ERR_SERVER_UNAVAILABLE', `control plane ${server} unreachable: ${(e as Error).message}`, { cause: e });
  }
  const json = (await res.body.json().catch(() => ({}))) as Signed & { error?: string; code?: string };
  if (res.statusCode >= 400) {
    const code = json.code === 'KNIT_ERR_UNAUTHORIZED' || json.code === 'KNIT_ERR_BAD_REQUEST' || json.code === 'KNIT_ERR_CA' ? json.code : 'KNIT_ERR_SERVER_UNAVAILABLE';
    throw new KnitError(code, `control plane ${path}: ${json.error ?? `HTTP ${res.statusCode}`}`);
  }
  return json;
}

const toLeaf = (s: Signed): SignedLeaf => ({ certPem: s.cert, chainPem: s.chain ?? [], notAfter: new Date(new X509Certificate(s.cert).validTo) });

/**
 * Fetches the server's roots and trust domain without trusting it yet, and
 * checks the roots against the join token's CA hash: only then is the
 * server trusted.
 */
async function discoverRoots(server: string, expectedHash: string): Promise<{ roots: string[]; trustDomain: string }> {
  const insecure = new Dispatcher({ connect: { rejectUnauthorized: false } });
  try {
    const res = await request(`${server}/v1/ca/roots`, { dispatcher: insecure, signal: AbortSignal.timeout(15_000) });
    const got = (await res.body.json()) as { roots: string[]; trustDomain: string };
    const match = got.roots.find((r) => caHash(r) === expectedHash);
    if (!match) throw new KnitError('KNIT_ERR_UNAUTHORIZED', `the control plane at ${server} does not hold the CA named in the join token: refusing to enrol`);
    return got;
  } catch (e) {
    if (e instanceof KnitError) throw e;
    throw new KnitError('KNIT_ERR_SERVER_UNAVAILABLE', `control plane ${server} unreachable: ${(e as Error).message}`, { cause: e });
  } finally {
    await insecure.close();
  }
}

/** Enrols a node with a join token; the key is made here. Returns the agent's first identity. */
export async function enrol(server: string, token: string, node: string): Promise<{ tls: ServiceTls; trustDomain: string }> {
  const { caHash } = parseJoinToken(token);
  const { roots, trustDomain } = await discoverRoots(server, caHash);
  const id = agentId(trustDomain, node);
  const { keyPem, csrPem } = await createCsr(id);
  const d = new Dispatcher({ connect: { ca: roots, checkServerIdentity: checkServer(trustDomain) } });
  try {
    const s = await post(server, '/v1/agent/enrol', { token: token.trim(), node, csr: csrPem }, d);
    validateLeaf(s.cert, id);
    return { tls: { certChainPem: [s.cert, ...(s.chain ?? [])].join('\n'), keyPem, trustBundlePem: s.roots }, trustDomain };
  } finally {
    await d.close();
  }
}

/** A client authenticated with the agent's own certificate. */
export class ControlClient implements CertSigner {
  private dispatcher: Dispatcher;
  private roots: string[];

  constructor(private readonly server: string, private readonly trustDomain: string, identity: ServiceTls) {
    this.roots = identity.trustBundlePem;
    this.dispatcher = this.make(identity);
  }

  private make(t: ServiceTls): Dispatcher {
    return new Dispatcher({ connect: { ca: t.trustBundlePem, cert: t.certChainPem, key: t.keyPem, checkServerIdentity: checkServer(this.trustDomain) } });
  }

  /** Switches to renewed agent material; requests in flight finish on the old connection. */
  setIdentity(t: ServiceTls): void {
    const old = this.dispatcher;
    this.dispatcher = this.make(t);
    this.roots = t.trustBundlePem;
    void old.close();
  }

  async renewAgent(csrPem: string): Promise<SignedLeaf> {
    const s = await post(this.server, '/v1/agent/renew', { csr: csrPem }, this.dispatcher);
    this.roots = s.roots;
    return toLeaf(s);
  }

  async signService(service: string, csrPem: string): Promise<SignedLeaf> {
    const s = await post(this.server, '/v1/agent/sign', { service, csr: csrPem }, this.dispatcher);
    this.roots = s.roots;
    return toLeaf(s);
  }

  async trustBundle(): Promise<string[]> {
    return this.roots;
  }

  async close(): Promise<void> {
    await this.dispatcher.close();
  }
}
