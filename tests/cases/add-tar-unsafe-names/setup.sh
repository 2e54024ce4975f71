mkdir -p p/a && echo x > p/a/x && echo y > p/y
tar -P -C p -cf weird.tar --transform 's,^a/x,../../escape-x,;s,^y,/abs-y,' a/x y
rm -rf p
