import { test } from 'node:test';
import assert from 'node:assert/strict';
import { handshakeReason } from './hbone.js';

/** OpenSSL's messages start with a per-thread address and end with a source path: neither may reach a metric label. */
const openssl = (code: string, fn: string, reason: string) => Object.assign(new Error(`80DC4720FC7E0000:error:${code}:SSL routines:${fn}:${reason}:../deps/openssl/openssl/ssl/statem/statem_srvr.c:1661:`), { code: `ERR_SSL_${reason.toUpperCase().replace(/ /g, '_')}` });

test('handshakeReason: every failed handshake gets a short fixed reason', () => {
  const sni = 'api.default.svc.test.knit';
  const cases: Array<[Error & { code?: string }, string | null, string]> = [
    [openssl('0A0000C7', 'tls_process_client_certificate', 'peer did not return a certificate'), sni, 'no client certificate'],
    [Object.assign(new Error('Invalid SNI context'), { code: 'ERR_SSL_CALLBACK_FAILED' }), sni, 'no local service of that name (SNI)'],
    [Object.assign(new Error('TLS handshake timeout'), { code: 'ERR_TLS_HANDSHAKE_TIMEOUT' }), null, 'handshake timeout'],
    [Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' }), null, 'client closed during handshake'],
    [Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' }), null, 'client closed during handshake'],
    [openssl('0A00009C', 'ssl3_get_record', 'http request'), null, 'not a TLS client'],
    [openssl('0A0000EB', 'tls_handle_alpn', 'no application protocol'), sni, 'client did not offer HBONE (ALPN h2)'],
    [openssl('0A000076', 'tls_choose_sigalg', 'no suitable signature algorithm'), null, 'no SNI: the client did not name the service it calls'],
    [openssl('0A000076', 'tls_choose_sigalg', 'no suitable signature algorithm'), sni, 'handshake failed: no suitable signature algorithm'],
    [openssl('0A0000C1', 'tls_post_process_client_hello', 'no shared cipher'), sni, 'handshake failed: no shared cipher'],
  ];
  for (const [err, servername, reason] of cases) assert.equal(handshakeReason(err, servername), reason, err.message);
});
