# Ports for the servers these scripts start (sourced). Binding port 0, closing the socket and passing the
# number on races every other process: until the server binds it, the kernel may give it to anyone's next
# bind(0) or outgoing connection. So a port is taken from just below the kernel's ephemeral range, which
# neither uses, and reserved by an exclusive flock(1) on ${TMPDIR:-/tmp}/umw-ports/<port>, the same lock the
# Rust tests take (tests/src/ports.rs).
#
# reserve_port NAME [HOST]: sets NAME to a port no test holds and nothing listens on at HOST (127.0.0.1).
# The lock stays on a file descriptor of this shell, so every server started afterwards inherits it and the
# port stays reserved while any of them runs.
reserve_port() {
  # Prefixed, so that none of them is the variable NAME the caller wants set.
  local _p_name=$1 _p_host=${2:-127.0.0.1} _p_first _p_last _p_low _p_high _p_dir _p_number _p_fd _p_i
  read -r _p_first _p_last < /proc/sys/net/ipv4/ip_local_port_range
  if [ "$_p_first" -ge 11024 ]; then _p_low=$((_p_first - 10000)); _p_high=$_p_first
  else _p_low=$((_p_last + 1)); _p_high=$((_p_last + 10001)); fi
  _p_dir="${TMPDIR:-/tmp}/umw-ports"
  mkdir -p "$_p_dir"
  _p_number=$((_p_low + (RANDOM * 32768 + RANDOM) % (_p_high - _p_low)))
  for ((_p_i = 0; _p_i < _p_high - _p_low; _p_i++)); do
    _p_number=$((_p_number + 1 < _p_high ? _p_number + 1 : _p_low))
    exec {_p_fd}>>"$_p_dir/$_p_number"
    if flock -n "$_p_fd" && python3 -c 'import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))' "$_p_host" "$_p_number" 2>/dev/null; then
      printf -v "$_p_name" %s "$_p_number"
      return 0
    fi
    exec {_p_fd}>&-
  done
  printf 'no free port on %s in %s-%s\n' "$_p_host" "$_p_low" "$((_p_high - 1))" >&2
  return 1
}
