-- POSTs a 2 KiB body on every request (the uploads of an API, a form or a webhook):
--   WRK_ARGS="-s bench/post.lua" CONNS=64 bench/compare.sh
wrk.method = "POST"
wrk.body = string.rep("x", 2048)
wrk.headers["Content-Type"] = "application/octet-stream"
