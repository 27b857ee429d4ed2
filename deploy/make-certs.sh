#!/usr/bin/env bash
# Makes a private CA, a server certificate and one client certificate for
# Coffre's TLS (and mTLS), with openssl. For a trial, or a hospital without
# a PKI; where one exists, ask it for the same three things.
#
#   deploy/make-certs.sh OUT_DIR [SERVER_NAME...]
#
# OUT_DIR gets: ca.pem, ca.key (keep it offline: it signs clients),
# server.pem, server.key, client.pem, client.key (mode 0600 for keys).
# SERVER_NAME: the DNS names (and IPs) clients use; default localhost and
# 127.0.0.1. Run it again with a new OUT_DIR to renew; the server takes new
# files on SIGHUP or within seconds of them changing.
set -euo pipefail
out=${1:?usage: make-certs.sh OUT_DIR [SERVER_NAME...]}
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(localhost 127.0.0.1)
mkdir -p "$out"
cd "$out"
umask 077
for f in ca.key server.key client.key; do
  if [ -e "$f" ]; then echo "make-certs: $out/$f exists; use a new directory" >&2; exit 1; fi
done
san=""
for n in "${names[@]}"; do
  if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san=${san%,}

# The CA: ECDSA P-256, 5 years.
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout ca.key -out ca.pem -days 1825 -subj "/CN=Coffre CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

leaf() { # name subject extensions
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -out "$1.pem" -days 397 -extfile <(printf '%s\n' "$3") 2>/dev/null
  rm -f "$1.csr"
}
leaf server "/CN=${names[0]}" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
leaf client "/CN=coffre-client" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
chmod 0644 ca.pem server.pem client.pem
echo "make-certs: wrote $out/{ca,server,client}.{pem,key} for ${names[*]}"
echo "make-certs: client serial $(openssl x509 -in client.pem -noout -serial) (for tls.deny_serials_file)"
