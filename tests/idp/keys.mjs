// Makes a signing key for the auth tests: `node keys.mjs <dir> <kid> <rsa|rsa1024|ec>` writes
// <kid>.jwk (the private JWK, for the provider), <kid>.pub.jwk (the public JWK) and <kid>.der (the private
// key as PKCS#8 DER, for tokens the tests sign themselves).
import { generateKeyPairSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

const [dir, kid, type] = process.argv.slice(2);
const options = {
  rsa: ['rsa', { modulusLength: 2048 }, 'RS256'],
  rsa1024: ['rsa', { modulusLength: 1024 }, 'RS256'],
  ec: ['ec', { namedCurve: 'P-256' }, 'ES256'],
}[type];
if (!dir || !kid || !options) {
  console.error('usage: node keys.mjs <dir> <kid> <rsa|rsa1024|ec>');
  process.exit(2);
}
const [kind, parameters, alg] = options;
const { privateKey, publicKey } = generateKeyPairSync(kind, parameters);
const meta = { kid, alg, use: 'sig' };
writeFileSync(join(dir, `${kid}.jwk`), JSON.stringify({ ...privateKey.export({ format: 'jwk' }), ...meta }));
writeFileSync(join(dir, `${kid}.pub.jwk`), JSON.stringify({ ...publicKey.export({ format: 'jwk' }), ...meta }));
writeFileSync(join(dir, `${kid}.der`), privateKey.export({ format: 'der', type: 'pkcs8' }));
