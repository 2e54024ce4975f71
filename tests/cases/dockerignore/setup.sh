echo a > a.log; echo i > important.log; echo k > keep.txt; echo r > rooted.txt
mkdir -p build/x docs/a/private docs/b sub/deeper nested/x/y
echo b > build/x/b; echo t > sub/deeper/x.tmp; echo t > top.tmp; echo p > docs/a/private/p; echo q > docs/b/q
echo s > nested/x/y/skip-me; echo k > nested/x/y/keep-me; echo s > nested/skip-top
