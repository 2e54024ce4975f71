mkdir -p dir/sub docs a/b/generated generated
echo k > dir/keep; echo d > dir/drop; echo s > dir/sub/s
echo r > docs/README.md; echo o > docs/other.md; echo t > top.md
echo g > a/b/generated/x; echo g > generated/y; echo ok > a/b/ok
