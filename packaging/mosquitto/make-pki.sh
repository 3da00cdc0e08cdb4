#!/usr/bin/env bash
# A small certificate authority for a Lampyre hub broker (test benches, pilots), with openssl.
#
#   make-pki.sh DIR init                     the CA (ca.pem, ca.key) and an empty CRL (crl.pem)
#   make-pki.sh DIR broker NAME [NAME...]    the broker's certificate: each NAME a DNS name or an
#                                            IP address the gateways use to reach it
#   make-pki.sh DIR client CN                a client certificate, <CN>.pem and <CN>.key: a
#                                            gateway (CN = its gateway id), control-post or hub
#   make-pki.sh DIR revoke CN                revoke <CN>.pem and write a new crl.pem
#   make-pki.sh DIR crl                      sign crl.pem again (it expires after CRL_DAYS)
#
# Keys are EC P-256, written with mode 0600. The CA key signs every identity the broker trusts:
# keep DIR off the broker and off the network once the certificates are out. Validity (days) can
# be changed through the environment: CA_DAYS (3650), CERT_DAYS (825), CRL_DAYS (365).
set -euo pipefail

usage() {
    # The comment block at the top of this file.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}

[ "$#" -ge 2 ] || usage
dir=$1
command=$2
shift 2

CA_DAYS=${CA_DAYS:-3650}
CERT_DAYS=${CERT_DAYS:-825}
CRL_DAYS=${CRL_DAYS:-365}
conf="$dir/openssl.cnf"
# The subjectAltName of the broker's certificate; openssl wants it defined whatever it does.
export LAMPYRE_SAN="DNS:localhost"

# A client certificate's CN is the MQTT user name the broker's ACL sees (use_identity_as_username),
# so it follows the gateway id rule of the agent's configuration: no '/', '+' or '#' can sneak
# into a topic through it.
check_name() {
    if ! [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ ]]; then
        echo "make-pki.sh: '$1' is not a valid name: 1 to 64 letters, digits, '_' or '-'," \
            "starting with a letter or digit" >&2
        exit 2
    fi
}

# Run an openssl command whose chatter on stderr is only interesting when it fails.
quiet() {
    local output
    if ! output=$("$@" 2>&1); then
        echo "$output" >&2
        exit 1
    fi
}

new_key() {
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1")
}

write_config() {
    cat >"$conf" <<EOF
# Written by make-pki.sh: the openssl ca settings of this Lampyre CA.
[ ca ]
default_ca = lampyre_ca

[ lampyre_ca ]
dir = $dir
database = \$dir/index.txt
new_certs_dir = \$dir/issued
certificate = \$dir/ca.pem
private_key = \$dir/ca.key
serial = \$dir/serial
crlnumber = \$dir/crlnumber
default_md = sha256
default_days = $CERT_DAYS
default_crl_days = $CRL_DAYS
policy = policy_cn_only
# A renewed certificate keeps its CN; revoke the old one if it must stop working at once.
unique_subject = no
copy_extensions = none

[ policy_cn_only ]
commonName = supplied

[ req ]
distinguished_name = req_dn
prompt = no

[ req_dn ]

[ ca_ext ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ client_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[ server_ext ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = \$ENV::LAMPYRE_SAN
EOF
}

# Sign a request for CN with the given extension section: DIR/<file>.pem.
issue() {
    local cn=$1 file=$2 extensions=$3
    new_key "$dir/$file.key"
    openssl req -new -config "$conf" -key "$dir/$file.key" -subj "/CN=$cn" -out "$dir/$file.csr"
    quiet openssl ca -batch -notext -config "$conf" -extensions "$extensions" \
        -in "$dir/$file.csr" -out "$dir/$file.pem"
    rm -f "$dir/$file.csr"
    echo "$dir/$file.pem, $dir/$file.key (CN $cn)"
}

gencrl() {
    quiet openssl ca -batch -config "$conf" -gencrl -out "$dir/crl.pem"
    echo "$dir/crl.pem (valid $CRL_DAYS days: sign it again with '$0 $dir crl' before then)"
}

need_ca() {
    [ -f "$dir/ca.key" ] || {
        echo "make-pki.sh: no CA in $dir: run '$0 $dir init' first" >&2
        exit 2
    }
    dir=$(cd "$dir" && pwd)
    conf="$dir/openssl.cnf"
    write_config
}

case "$command" in
init)
    [ "$#" -eq 0 ] || usage
    if [ -e "$dir/ca.key" ]; then
        echo "make-pki.sh: $dir already holds a CA; refusing to replace it" >&2
        exit 2
    fi
    mkdir -p "$dir/issued"
    chmod 700 "$dir"
    # openssl.cnf names the folder: absolute, so the script works from any working directory.
    dir=$(cd "$dir" && pwd)
    conf="$dir/openssl.cnf"
    : >"$dir/index.txt"
    echo 1000 >"$dir/crlnumber"
    openssl rand -hex 16 >"$dir/serial"
    write_config
    new_key "$dir/ca.key"
    openssl req -x509 -new -config "$conf" -extensions ca_ext -key "$dir/ca.key" \
        -subj "/CN=Lampyre hub CA" -days "$CA_DAYS" -out "$dir/ca.pem"
    echo "$dir/ca.pem, $dir/ca.key"
    gencrl
    ;;
broker)
    [ "$#" -ge 1 ] || usage
    need_ca
    san=""
    for name in "$@"; do
        if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
            san+="${san:+,}IP:$name"
        else
            san+="${san:+,}DNS:$name"
        fi
    done
    LAMPYRE_SAN=$san
    issue "$1" broker server_ext
    ;;
client)
    [ "$#" -eq 1 ] || usage
    check_name "$1"
    need_ca
    issue "$1" "$1" client_ext
    ;;
revoke)
    [ "$#" -eq 1 ] || usage
    check_name "$1"
    need_ca
    [ -f "$dir/$1.pem" ] || {
        echo "make-pki.sh: no certificate $dir/$1.pem" >&2
        exit 2
    }
    quiet openssl ca -config "$conf" -revoke "$dir/$1.pem"
    echo "revoked $dir/$1.pem"
    gencrl
    ;;
crl)
    [ "$#" -eq 0 ] || usage
    need_ca
    gencrl
    ;;
*)
    usage
    ;;
esac
